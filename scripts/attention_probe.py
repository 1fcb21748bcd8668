"""Time attention variants at pi0's denoise shapes (8 query heads x 51 tokens, 1 KV head x 867 keys, d=256)."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pi_policy.model.layers import attention
from pi_policy.runtime.timer import time_graph

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
b, h, t, s, d = 1, 8, 51, 867, 256
q = torch.randn(b, h, t, d, device=dev, dtype=dt)
k = torch.randn(b, 1, s, d, device=dev, dtype=dt)
v = torch.randn(b, 1, s, d, device=dev, dtype=dt)
mask = torch.ones(b, t, s, dtype=torch.bool, device=dev)
mask[:, :, 700:816] = False  # padded prompt
mask[:, 0, 817:] = False  # the state token sees only itself among the suffix
ref = attention(q.float(), k.float(), v.float(), mask)


def sdpa_gqa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


def sdpa_efficient(q, k, v, mask):
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q, k.expand(-1, h, -1, -1), v.expand(-1, h, -1, -1),
                                              attn_mask=mask[:, None])


variants = {"folded matmul (current)": attention, "sdpa enable_gqa": sdpa_gqa, "sdpa efficient": sdpa_efficient}
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flat = mask[0]
    block = create_block_mask(lambda b_, h_, qi, ki: flat[qi, ki], None, None, t, s, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)
    variants["flex"] = lambda q, k, v, mask: flex(q, k, v, block_mask=block, enable_gqa=True)
except Exception as e:  # noqa: BLE001
    print(f"flex unavailable: {type(e).__name__}: {e}")

for name, fn in variants.items():
    try:
        f = torch.compile(fn, dynamic=False) if name != "flex" else fn
        out = f(q, k, v, mask)
        err = (out.float() - ref).abs().max().item()
        ms = time_graph(lambda f=f: f(q, k, v, mask), 180)
        print(f"{name:26s} {ms * 1e3:7.2f} us/call  max err {err:.4f}")
    except Exception as e:  # noqa: BLE001
        print(f"{name:26s} failed: {type(e).__name__}: {str(e)[:200]}")
