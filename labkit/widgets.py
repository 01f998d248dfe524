"""An interactive quantization playground: bits, group size and scheme -> histogram of weights and their error.

``render(w, bits, group_size, scheme)`` draws one static view with matplotlib (works headless, e.g. in nbval);
``playground(w)`` wraps it in ipywidgets sliders and shows the default view at once, so a notebook run without a
live kernel still shows a figure.
"""
from __future__ import annotations

import torch

from labkit import quant

SCHEMES = ("zeropoint", "absmax", "nf4", "log")


def render(w: torch.Tensor, bits: int = 4, group_size: int = 128, scheme: str = "zeropoint", ax=None) -> dict:
    """Fake-quantize ``w (out, in)`` per group and plot the weight histogram, the values on the grid, and the error.

    Returns ``{"sqnr_db", "mse", "bits_per_weight"}`` for the chosen setting.
    """
    import matplotlib.pyplot as plt

    if scheme == "nf4" and bits != 4:
        bits = 4  # NF4 is a 4-bit code
    wq = quant.fake_quant(w, bits, scheme, "group", group_size)
    stats = {"sqnr_db": quant.sqnr_db(w, wq), "mse": quant.mse(w, wq),
             "bits_per_weight": quant.bits_per_weight(bits, group_size, 16, bits if scheme == "zeropoint" else 0)}
    if ax is None:
        _, ax = plt.subplots(1, 2, figsize=(11, 3.2))
    lim = float(w.abs().max())
    ax[0].hist(w.flatten().numpy(), bins=200, range=(-lim, lim), color="0.7", label="weights")
    ax[0].hist(wq.flatten().numpy(), bins=200, range=(-lim, lim), histtype="step", color="C3", label="quantized")
    ax[0].set_yscale("log")
    ax[0].set_title(f"{scheme}, {bits} bits, group {group_size}: SQNR {stats['sqnr_db']:.1f} dB")
    ax[0].legend(fontsize=8)
    err = (w - wq).flatten().numpy()
    ax[1].hist(err, bins=200, color="C0")
    ax[1].set_title(f"error  (MSE {stats['mse']:.2e}, {stats['bits_per_weight']:.2f} bits/weight)")
    plt.tight_layout()
    plt.show()
    return stats


def playground(w: torch.Tensor, bits: int = 4, group_size: int = 128, scheme: str = "zeropoint"):
    """Sliders for bits, group size and scheme over ``render``; the default view is drawn immediately."""
    try:
        import ipywidgets as W
    except ImportError:
        render(w, bits, group_size, scheme)
        return None
    groups = [g for g in (16, 32, 64, 128, 256, 576, 1536) if g <= w.shape[1]]
    return W.interact(lambda bits, group_size, scheme: render(w, bits, group_size, scheme),
                      bits=W.IntSlider(value=bits, min=2, max=8, description="bits"),
                      group_size=W.SelectionSlider(options=groups, value=group_size if group_size in groups else groups[-1],
                                                   description="group"),
                      scheme=W.Dropdown(options=SCHEMES, value=scheme, description="scheme"))
