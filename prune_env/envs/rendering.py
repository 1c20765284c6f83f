"""Renderings of an allocation: an ANSI table for terminals, an RGB bar plot for videos and notebooks."""

from __future__ import annotations

import numpy as np


def render_allocation(names: list[str], ratios: list[float], z_wanda: list[float], z_grad: list[float],
                      target: float, mode: str):
    if mode == "ansi":
        lines = [f"{'unit':<36} {'ratio':>6} {'z_wanda':>8} {'z_grad':>8}"]
        lines += [f"{n:<36} {r:6.3f} {zw:8.2f} {zg:8.2f}" for n, r, zw, zg in zip(names, ratios, z_wanda, z_grad)]
        lines.append(f"target {target:.3f}")
        return "\n".join(lines) + "\n"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
    ax.bar(range(len(ratios)), ratios, color="tab:blue")
    ax.axhline(target, color="tab:red", linestyle="--", label=f"target {target:.2f}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("unit")
    ax.set_ylabel("sparsity")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
