import os, torch, json
from pathlib import Path
from labkit.kernels import wo_matmul as wo
OUT = Path(os.environ["OUT"])
N, K = 22016, 4096
w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
q4 = wo.interleave(wo.quantize_int4(w, 128))
cfg = wo.GemvConfig(16, 1024, 4)
wo.wo_matmul(x, q4, config=cfg)
print("us", wo.time_gemv(x, q4, False, cfg) * 1e3)
for dcache in wo._wo_gemv_il_kernel.device_caches.values():
    cache = dcache[0] if isinstance(dcache, tuple) else dcache
    for key, ck in cache.items():
        print("regs", ck.n_regs, "spills", ck.n_spills)
        (OUT / "il4.sass").write_text(ck.asm["sass"])
        (OUT / "il4.ptx").write_text(ck.asm["ptx"])
        (OUT / "il4.ttgir").write_text(ck.asm.get("ttgir", ""))
