"""`python train.py --config configs/llm-grpo.yaml`: LoRA fine-tuning of the LLM agent (SFT warm start, then GRPO).

The config has train.py's sections: `env` (train.py's EnvConfig: the surrogate reward env), `algo`
(name: grpo, the base model, LoRA, the SFT and GRPO phases), `checkpoint`, `logging`, `run_dir`.
The run folder:

    config.yaml              the resolved config (a --resume may not change env.*, algo.model, algo.lora.*)
    sft/checkpoint-N/        TRL checkpoints of the SFT phase (adapter as safetensors, optimizer, RNG)
    sft/adapter/             the warm-started adapter (written when the phase ends)
    grpo/checkpoint-N/       TRL checkpoints of the GRPO phase
    adapter/                 the trained adapter: adapter_model.safetensors, adapter_config.json, tuning.json
    {sft,grpo}/runs/         TensorBoard logs (logging.tensorboard)

`--resume` skips a finished phase and continues an unfinished one from its newest COMPLETE checkpoint
(a folder a kill -9 cut short lacks trainer_state.json and is passed over), through TRL's
`resume_from_checkpoint`. Adapters are written with `save_pretrained` (safetensors, no pickle).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from agents.llm.tuning import AllocationReward, draw_targets, ensure_chat_template, prompt_rows, read_records, \
    reward_env, sft_rows
from training.train_config import CheckpointConfig, EnvConfig, LoggingConfig
from prune_env.config_files import ConfigError, dataclass_from_dict, load_config, read_yaml
from prune_env.files import atomic_write_json, atomic_write_text, output_lock
from prune_env.validation import check_choice, check_number, check_target

__all__ = ["TUNING_FILE", "TuningConfig", "is_grpo_config", "resolve_tuning_config", "tune"]

TUNING_FILE = "tuning.json"
CONFIG_NAME = "config.yaml"
FIXED_ON_RESUME = ("env.", "algo.model", "algo.lora.")
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json")


@dataclass
class LoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        check_number("lora.r", self.r, low=1, integer=True)
        check_number("lora.alpha", self.alpha, low=1, integer=True)
        check_number("lora.dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"lora.target_modules={self.target_modules!r}: give module names such as [q_proj, v_proj]")


@dataclass
class SFTOptions:
    """The warm start: supervised steps on searched allocations (`data`: an sft-data file; max_steps 0 skips it)."""

    data: str | None = "docs/results/llm-trained/sft-data.jsonl"
    max_steps: int = 200
    learning_rate: float = 2e-4
    batch_size: int = 4  # examples per optimizer step
    micro_batch_size: int = 1  # examples per forward (a 1,860-token SmolLM2 example holds ~5 GB of activations)

    def __post_init__(self) -> None:
        check_number("sft.max_steps", self.max_steps, low=0, integer=True)
        check_number("sft.learning_rate", self.learning_rate, low=0.0, low_open=True)
        check_number("sft.batch_size", self.batch_size, low=1, integer=True)
        check_number("sft.micro_batch_size", self.micro_batch_size, low=1, integer=True)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"sft.batch_size={self.batch_size} is not a multiple of sft.micro_batch_size="
                             f"{self.micro_batch_size}")


@dataclass
class GRPOOptions:
    """GRPO: each step samples `num_generations` answers for each of `prompts_per_step` prompts."""

    max_steps: int = 500
    num_generations: int = 8
    prompts_per_step: int = 1
    micro_batch_size: int = 1  # completions per forward/backward (the step's num_generations x prompts_per_step
    #                            completions are generated at once, then trained on in micro-batches)
    max_completion_length: int = 448  # a 30-unit SmolLM2 answer: 389-403 tokens + EOS
    temperature: float = 1.0
    learning_rate: float = 1e-5
    beta: float = 0.0  # KL weight to the warm-started reference (0: no reference model is kept)
    n_prompts: int = 512  # prompts (targets) in the data set the steps cycle through
    malformed_penalty: float = -10.0  # valid returns are floored at penalty + 1

    def __post_init__(self) -> None:
        check_number("grpo.max_steps", self.max_steps, low=0, integer=True)
        check_number("grpo.num_generations", self.num_generations, low=2, integer=True)
        check_number("grpo.prompts_per_step", self.prompts_per_step, low=1, integer=True)
        check_number("grpo.micro_batch_size", self.micro_batch_size, low=1, integer=True)
        if (self.num_generations * self.prompts_per_step) % self.micro_batch_size:
            raise ValueError(f"grpo.micro_batch_size={self.micro_batch_size} must divide num_generations x "
                             f"prompts_per_step = {self.num_generations * self.prompts_per_step}")
        check_number("grpo.max_completion_length", self.max_completion_length, low=1, integer=True)
        check_number("grpo.temperature", self.temperature, low=0.0, low_open=True)
        check_number("grpo.learning_rate", self.learning_rate, low=0.0, low_open=True)
        check_number("grpo.beta", self.beta, low=0.0)
        check_number("grpo.n_prompts", self.n_prompts, low=1, integer=True)
        check_number("grpo.malformed_penalty", self.malformed_penalty)


@dataclass
class TuningAlgo:
    name: str = "grpo"
    model: str = "smollm2-135m"  # the policy LLM (SmolLM2-135M-Instruct), not the model being pruned
    seed: int = 0
    torch_threads: int | None = None
    gradient_checkpointing: bool = True  # recompute activations in the backward: less memory, ~1/3 more compute
    target_range: list[float] = field(default_factory=lambda: [0.3, 0.6])
    lora: LoraOptions = field(default_factory=LoraOptions)
    sft: SFTOptions = field(default_factory=SFTOptions)
    grpo: GRPOOptions = field(default_factory=GRPOOptions)

    def __post_init__(self) -> None:
        check_choice("algo.name", self.name, ("grpo",))
        check_number("algo.seed", self.seed, low=0, integer=True)
        if self.torch_threads is not None:
            check_number("algo.torch_threads", self.torch_threads, low=1, integer=True)
        if not isinstance(self.target_range, list) or len(self.target_range) != 2:
            raise ValueError(f"algo.target_range={self.target_range!r} is not [lo, hi]")
        low, high = (check_target(v, "algo.target_range") for v in self.target_range)
        if low > high:
            raise ValueError(f"algo.target_range={self.target_range!r}: lo > hi")


@dataclass
class TuningConfig:
    env: EnvConfig = field(default_factory=lambda: EnvConfig(fidelity="surrogate"))
    algo: TuningAlgo = field(default_factory=TuningAlgo)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=50))
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(wandb="disabled"))
    run_dir: str | None = None


DEFAULTS = asdict(TuningConfig())


def is_grpo_config(path: str | Path, overrides: list[str]) -> bool:
    """Whether a train.py config (after its overrides) asks for algo.name: grpo (this module's run); the same
    YAML and override parsing as every config, before either schema checks its keys."""
    algo = load_config(path, overrides).get("algo") or {}
    return isinstance(algo, dict) and algo.get("name") == "grpo"


def resolve_tuning_config(path: str | Path, overrides: list[str] | None = None) -> TuningConfig:
    """DEFAULTS <- YAML <- overrides, every value checked; run_dir defaults to runs/<config name>-<seed>."""
    values = load_config(path, overrides, DEFAULTS)
    try:
        config = TuningConfig(env=dataclass_from_dict(EnvConfig, values["env"], "env"),
                              algo=dataclass_from_dict(TuningAlgo, values["algo"], "algo"),
                              checkpoint=dataclass_from_dict(CheckpointConfig, values["checkpoint"], "checkpoint"),
                              logging=dataclass_from_dict(LoggingConfig, values["logging"], "logging"),
                              run_dir=values.get("run_dir"))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.env.fidelity != "surrogate":
        raise ConfigError(f"env.fidelity={config.env.fidelity!r}: GRPO plays thousands of episodes, use surrogate")
    if config.logging.wandb != "disabled":
        raise ConfigError("logging.wandb: the GRPO run logs to TensorBoard only; set logging.wandb=disabled")
    if config.run_dir is None:
        config.run_dir = str(Path("runs") / f"{Path(path).stem}-{config.algo.seed}")
    return config


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key: value})
    return out


def _check_resume(run_dir: Path, config: dict, resume: bool) -> None:
    saved = run_dir / CONFIG_NAME
    if not saved.exists():
        return
    if not resume:
        raise ConfigError(f"run_dir {str(run_dir)!r} already holds a run: pass --resume to continue it, or set "
                          "run_dir=... for a new one")
    old, new = _flatten(read_yaml(saved, "the run's config")), _flatten(config)
    fixed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k.startswith(FIXED_ON_RESUME))
    if fixed:
        raise ConfigError(f"--resume: the config differs from the run's {CONFIG_NAME} in {fixed}; these cannot change "
                          "in a resumed run (start a new run_dir instead)")


def _complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last (after the adapter, optimizer and RNG states): a checkpoint
    with all of CHECKPOINT_FILES and a readable state was saved in full."""
    if not all((checkpoint / name).is_file() for name in CHECKPOINT_FILES):
        return False
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return False
    return True


def latest_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint-N folder saved in full (a save cut short by a kill is passed over)."""
    done = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and _complete(p)]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _save_adapter(model, folder: Path, tuning: dict | None = None) -> None:
    """save_pretrained (safetensors) into folder.partial, then one rename: a kill leaves no half adapter."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    if tuning is not None:
        atomic_write_json(partial / TUNING_FILE, tuning, indent=1)
    partial.rename(folder)


def _args(cls, config: TuningConfig, out: Path, max_steps: int, learning_rate: float, **extra):
    """TRL's config for one phase: CPU/GPU, checkpoints, TensorBoard, progress bar, seed."""
    import torch

    return cls(output_dir=str(out), max_steps=max_steps, learning_rate=learning_rate, seed=config.algo.seed,
               data_seed=config.algo.seed, save_strategy="steps", save_steps=max(config.checkpoint.every_steps, 1),
               save_total_limit=config.checkpoint.keep, logging_steps=1,
               report_to=["tensorboard"] if config.logging.tensorboard else "none",
               disable_tqdm=not config.logging.progress_bar, use_cpu=not torch.cuda.is_available(),
               bf16=False, gradient_checkpointing=config.algo.gradient_checkpointing, **extra)


def _base(config: TuningConfig):
    from prune_env.models import load_model

    model, tokenizer = load_model(config.algo.model, "cuda" if _cuda() else "cpu", "float32")
    ensure_chat_template(tokenizer)
    model.config.use_cache = True
    return trainable(model), tokenizer


def trainable(model):
    """`model` without transformers' GGUF marker. A .gguf file (the smollm2-135m alias) loads as plain
    nn.Linear float weights, dequantized, yet keeps `hf_quantizer`, which Trainer refuses to train; a model
    whose weights really stay packed in GGUF modules is refused here instead."""
    if getattr(model, "hf_quantizer", None) is None:
        return model
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed or not all(p.dtype.is_floating_point for p in model.parameters()):
        raise ConfigError(f"algo.model={model.config._name_or_path!r} keeps quantized GGUF modules {packed}: LoRA "
                          "training needs float weights (load an unquantized folder)")
    model.hf_quantizer, model.is_quantized = None, False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _lora(config: TuningConfig):
    from peft import LoraConfig

    lora = config.algo.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM")


def _run_phase(trainer, folder: Path, say) -> None:
    """Train one phase, from its newest complete checkpoint; unfinished checkpoint folders are removed first
    (Trainer would otherwise count them when it rotates checkpoints)."""
    for partial in sorted(p for p in folder.glob("checkpoint-*") if p.is_dir() and not _complete(p)):
        shutil.rmtree(partial)
        say(f"removed unfinished checkpoint {partial}")
    latest = latest_complete_checkpoint(folder)
    if latest is not None:
        say(f"resuming {folder.name} from {latest}")
    trainer.train(resume_from_checkpoint=str(latest) if latest is not None else None)


def tune(config: TuningConfig, resume: bool = False, say=print) -> dict:
    """Run (or resume) SFT then GRPO under the run folder's lock; returns a summary."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    run_dir, algo, config_dict = Path(config.run_dir), config.algo, asdict(config)
    if algo.sft.max_steps and not (algo.sft.data and Path(algo.sft.data).is_file()):
        raise ConfigError(f"algo.sft.data={algo.sft.data!r} is not a file: make it with `python -m agents.llm.tuning "
                          "sft-data --out PATH`, or set algo.sft.max_steps=0 to skip the warm start")
    env = reward_env(asdict(config.env))  # before any folder is written: a bad env leaves nothing behind
    with output_lock(run_dir, "run folder"):
        _check_resume(run_dir, config_dict, resume)
        if (run_dir / "adapter" / TUNING_FILE).exists():
            say(f"{run_dir / 'adapter'} is already written: nothing to train")
            return {"run_dir": str(run_dir), "adapter": str(run_dir / "adapter")}
        atomic_write_text(run_dir / CONFIG_NAME, yaml.safe_dump(config_dict, sort_keys=False))
        if algo.torch_threads is not None:
            torch.set_num_threads(algo.torch_threads)
        started, ctx = time.time(), env.unwrapped.context
        sft_dir, sft_adapter, grpo_dir = run_dir / "sft", run_dir / "sft" / "adapter", run_dir / "grpo"
        if algo.sft.max_steps and not sft_adapter.exists():
            model, tokenizer = _base(config)
            data = Dataset.from_list(sft_rows(ctx, read_records(algo.sft.data)))
            args = _args(SFTConfig, config, sft_dir, algo.sft.max_steps, algo.sft.learning_rate,
                         per_device_train_batch_size=algo.sft.micro_batch_size, max_length=None,
                         gradient_accumulation_steps=algo.sft.batch_size // algo.sft.micro_batch_size)
            trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                 peft_config=_lora(config))
            _run_phase(trainer, sft_dir, say)
            _save_adapter(trainer.model, sft_adapter)
        model, tokenizer = _base(config)
        if sft_adapter.exists():
            model, peft_config = PeftModel.from_pretrained(model, str(sft_adapter), is_trainable=True), None
        else:
            peft_config = _lora(config)
        g = algo.grpo
        reward = AllocationReward(env, g.malformed_penalty)
        targets = draw_targets(g.n_prompts, algo.seed, *algo.target_range)
        accumulate = g.num_generations * g.prompts_per_step // g.micro_batch_size
        args = _args(GRPOConfig, config, grpo_dir, g.max_steps, g.learning_rate,
                     per_device_train_batch_size=g.micro_batch_size, gradient_accumulation_steps=accumulate,
                     steps_per_generation=accumulate, num_generations=g.num_generations,
                     max_completion_length=g.max_completion_length, temperature=g.temperature, beta=g.beta,
                     log_completions=False)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list(prompt_rows(ctx, targets)),
                              processing_class=tokenizer, peft_config=peft_config)
        if g.max_steps:
            _run_phase(trainer, grpo_dir, say)
        final = run_dir / "adapter"
        _save_adapter(trainer.model, final, {
            "base_model": algo.model, "max_new_tokens": g.max_completion_length, "prompt": "allocation_messages",
            "env": asdict(config.env), "target_range": algo.target_range, "sft_steps": algo.sft.max_steps,
            "grpo_steps": g.max_steps, "seed": algo.seed})
        summary = {"run_dir": str(run_dir), "adapter": str(final), "seconds": time.time() - started,
                   "reward_calls": reward.calls, "malformed": reward.malformed}
        say(f"done: adapter {final} ({summary['seconds']:.0f}s this session)")
        return summary


def main(path: str | Path, overrides: list[str], resume: bool, print_config: bool) -> int:
    """train.py's entry for an algo.name: grpo config (errors raise for train.py to report)."""
    config = resolve_tuning_config(path, overrides)
    if print_config:
        print(yaml.safe_dump(asdict(config), sort_keys=False), end="")
        return 0
    tune(config, resume=resume)
    return 0


def read_tuning(adapter: str | Path) -> dict:
    """The tuning.json beside a trained adapter (base model, answer length, what it was trained on)."""
    path = Path(adapter) / TUNING_FILE
    if not path.is_file():
        raise ConfigError(f"{adapter}: no {TUNING_FILE}: not an adapter written by train.py's GRPO run")
    return json.loads(path.read_text(encoding="utf-8"))
