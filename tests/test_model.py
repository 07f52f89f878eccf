"""The native IXC2.5 model on the tiny preset (CPU, fp32): packing, PLoRA, wqkv layout, checkpointing, 7B layout."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from schemas.sample import IGNORE_INDEX, image_token_count
from trainer import attention
from trainer.generate import generate
from trainer.model import (
    IXCModel,
    PLoRALinear,
    apply_rotary,
    build_model,
    compile_layers,
    num_parameters,
    plora_selector,
    rotary_cos_sin,
    row_token_losses,
)
from trainer.model_config import preset_config
from trainer.vision import assemble_image_tokens, merge_patches, patch_embeddings

# (text before, grid, text after) segments per sample; grid None = text only.
SAMPLES = [
    [(5, (1, 1)), (6, None)],
    [(20, None)],
    [(3, (1, 2)), (2, None)],
]


def make_sample(spec: list[tuple[int, tuple[int, int] | None]], gen: torch.Generator) -> dict:
    ids, grids, starts, tiles = [], [], [], []
    pos = 0
    for n_text, grid in spec:
        ids.append(torch.randint(3, 500, (n_text,), generator=gen))
        pos += n_text
        if grid is not None:
            n = image_token_count(*grid)
            ids.append(torch.zeros(n, dtype=torch.long))
            grids.append(grid)
            starts.append(pos)
            tiles.append(
                torch.randint(0, 256, (grid[0] * grid[1], 560, 560, 3), dtype=torch.uint8, generator=gen)
            )
            pos += n
    return {
        "ids": torch.cat(ids),
        "grids": grids,
        "starts": starts,
        "tiles": torch.cat(tiles) if tiles else torch.zeros(0, 560, 560, 3, dtype=torch.uint8),
    }


def row_inputs(samples: list[dict]) -> dict:
    """Pack samples into one row as the loader does (docs/ARCHITECTURE.md)."""
    offsets = [0]
    for s in samples:
        offsets.append(offsets[-1] + len(s["ids"]))
    grids = [g for s in samples for g in s["grids"]]
    starts = [st + off for s, off in zip(samples, offsets, strict=False) for st in s["starts"]]
    return {
        "input_ids": torch.cat([s["ids"] for s in samples])[None],
        "position_ids": torch.cat([torch.arange(len(s["ids"])) for s in samples])[None],
        "cu_seqlens": torch.tensor(offsets, dtype=torch.int32),
        "max_seqlen": max(len(s["ids"]) for s in samples),
        "tiles": torch.cat([s["tiles"] for s in samples]),
        "image_grids": torch.tensor(grids, dtype=torch.long).reshape(-1, 2),
        "image_starts": torch.tensor(starts, dtype=torch.long),
    }


@pytest.fixture(scope="module")
def model() -> IXCModel:
    return build_model("tiny", seed=0).eval()


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    return [make_sample(spec, gen) for spec in SAMPLES]


def test_packed_row_equals_each_sample_alone(model: IXCModel, samples: list[dict]) -> None:
    with torch.no_grad():
        packed = model(**row_inputs(samples), return_logits=True).logits[0]
        offset = 0
        for s in samples:
            alone = model(**row_inputs([s]), return_logits=True).logits[0]
            part = packed[offset : offset + len(s["ids"])]
            offset += len(s["ids"])
            # fp32: only the summation order of the batched matmuls differs.
            torch.testing.assert_close(part, alone, atol=1e-5, rtol=1e-5)


def test_text_sample_gets_no_plora_contribution(model: IXCModel, samples: list[dict]) -> None:
    inputs = row_inputs(samples)
    text_span = slice(len(samples[0]["ids"]), len(samples[0]["ids"]) + len(samples[1]["ids"]))
    image_span = slice(0, len(samples[0]["ids"]))
    changed = build_model("tiny", seed=0).eval()
    with torch.no_grad():
        for m in changed.plora_linears():
            m.Plora_B.weight.normal_(0, 0.5)
        before = model(**inputs, return_logits=True).logits[0]
        after = changed(**inputs, return_logits=True).logits[0]
    assert torch.equal(before[text_span], after[text_span])  # exactly: Plora never touches text
    assert not torch.allclose(before[image_span], after[image_span])


def test_wqkv_layout_matches_per_head_reference(model: IXCModel) -> None:
    """docs/IXC25.md#wqkv-layout: wqkv rows = (kv groups, q_per_kv + 2, head_dim); query head n in group n // q_per_kv."""
    c = model.config
    attention = model.model.layers[0].attention
    t, d, qpk = 7, c.head_dim, c.q_per_kv
    x = torch.randn(t, c.hidden_size, generator=torch.Generator().manual_seed(2))
    w = attention.wqkv.weight

    def rows(group: int, slot: int) -> torch.Tensor:
        start = (group * (qpk + 2) + slot) * d
        return w[start : start + d]

    # RoPE written out from its definition: pairs (i, i + d/2) rotated by pos · θ^(-2i/d).
    inv = c.rope_theta ** (-torch.arange(0, d, 2).double() / d)
    angle = torch.arange(t).double()[:, None] * inv[None]
    cos, sin = torch.cat([angle.cos()] * 2, 1).float(), torch.cat([angle.sin()] * 2, 1).float()

    def rope(v: torch.Tensor) -> torch.Tensor:
        return v * cos + torch.cat([-v[:, d // 2 :], v[:, : d // 2]], 1) * sin

    heads = []
    causal = torch.ones(t, t).tril().bool()
    for n in range(c.num_attention_heads):
        g, j = n // qpk, n % qpk
        q, k, v = rope(x @ rows(g, j).T), rope(x @ rows(g, qpk).T), x @ rows(g, qpk + 1).T
        scores = (q @ k.T / math.sqrt(d)).masked_fill(~causal, float("-inf"))
        heads.append(scores.softmax(-1) @ v)
    expected = torch.cat(heads, 1) @ attention.wo.weight.T

    with torch.no_grad():
        cs = rotary_cos_sin(torch.arange(t), c, torch.float32)
        got = attention(x, cs, None, torch.tensor([0, t], dtype=torch.int32), t, "sdpa")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_checkpointing_and_compiled_layers_give_same_gradients(samples: list[dict]) -> None:
    inputs = row_inputs(samples[:2])  # one image: the ViT is most of the CPU time
    targets = torch.randint(0, 500, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(3))
    grads = []
    # (checkpointing, layers recomputed, compiled): plain, all layers, the first only, compiled
    # (aot_eager: dynamo + AOTAutograd as in training, without needing a C++ compiler)
    for enabled, layers, compiled in (
        (False, None, False),
        (True, None, False),
        (True, 1, False),
        (True, 1, True),
    ):
        m = build_model("tiny", seed=0).train()  # train: PLoRA dropout is on, its RNG must replay
        if enabled:
            m.gradient_checkpointing_enable()
            m.checkpoint_layers = layers
        if compiled:
            assert compile_layers(m, backend="aot_eager") == (
                m.config.num_hidden_layers,
                m.config.vit_num_hidden_layers,
            )
        torch.manual_seed(4)
        out = m(**inputs, targets=targets)
        (out.loss_sum / out.num_tokens).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert any("Plora_A" in n for n in grads[0]) and any("vit." in n for n in grads[0])
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_plora_mask_and_index_forms_agree() -> None:
    gen = torch.Generator().manual_seed(5)
    layer = PLoRALinear(16, 24, plora_r=4, dropout=0.0, unused_ranks={})
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(10, 16, generator=gen)
    index = torch.tensor([1, 2, 3, 7, 8])
    results = []
    for selector in (index, plora_selector(index, 10, x.dtype)):
        xi = x.clone().requires_grad_(True)
        out = layer(xi, selector)
        out.backward(torch.ones_like(out))
        results.append(
            (out.detach(), xi.grad, layer.Plora_A.weight.grad.clone(), layer.Plora_B.weight.grad.clone())
        )
        layer.zero_grad()
    assert plora_selector(index, 10, x.dtype).squeeze(1).nonzero().squeeze(1).tolist() == index.tolist()
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    empty = torch.zeros(0, dtype=torch.long)
    assert plora_selector(empty, 10, x.dtype) is empty and plora_selector(None, 10, x.dtype) is None


def _fake_fa4(calls: list[dict]):
    """Stands in for flash_attn.cute's flash_attn_varlen_func on the CPU: records the call and
    answers with per-sample SDPA, as (out, lse) like the real one."""

    def fa4(q, k, v, **kwargs):
        calls.append(kwargs)
        out = attention.varlen_attention(
            q,
            k,
            v,
            kwargs["cu_seqlens_q"],
            kwargs["max_seqlen_q"],
            "sdpa",
            kwargs["cu_seqlens_k"],
            kwargs["max_seqlen_k"],
        )
        return out, torch.zeros(q.shape[1], q.shape[0])

    return fa4


def test_fa4_backend_is_wired_like_the_other_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(attention, "fa4_varlen_func", None)
    with pytest.raises(ValueError, match="flash-attn-4 is not installed"):
        attention.resolve_backend("fa4", cpu, torch.bfloat16, 128)
    calls: list[dict] = []
    monkeypatch.setattr(attention, "fa4_varlen_func", _fake_fa4(calls))
    assert attention.resolve_backend("auto", cpu, torch.float32, 128) == "sdpa"  # sm90/sm100 only
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attention.resolve_backend("fa4", cpu, torch.bfloat16, 128)
    with pytest.raises(ValueError, match="checked at head dims"):  # wrong gradients at 16 (b36)
        attention.resolve_backend("fa4", cpu, torch.bfloat16, 16)

    # Inside a compiled region the call runs outside the graph (compiler.disable): same values and
    # gradients as the SDPA path, with GQA's 2 K/V heads passed through as they are.
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(23, h, 8, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, 10, 11, 23], dtype=torch.int32)
    results = []
    for backend, compiled in (("sdpa", False), ("fa4", True)):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]

        def run(q, k, v, backend=backend):
            return attention.varlen_attention(q * 2, k, v, cu, 13, backend).tanh()

        fn = torch.compile(run, backend="aot_eager", dynamic=True) if compiled else run
        out = fn(*inputs)
        out.sum().backward()
        results.append([out.detach(), *(t.grad for t in inputs)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert calls and all(c["causal"] and c["cu_seqlens_q"] is c["cu_seqlens_k"] for c in calls)
    assert calls[0]["max_seqlen_q"] == 13

    calls.clear()
    seconds = attention.warm_up("fa4", 4, 2, 8, torch.float32, cpu, lengths=(1, 5, 17))
    # each length, all as one row, then fewer queries than keys (the last layer's trained runs)
    assert seconds >= 0 and [c["max_seqlen_q"] for c in calls] == [1, 5, 17, 17, 1, 1]
    assert [c["max_seqlen_k"] for c in calls] == [1, 5, 17, 17, 5, 17]


def test_frozen_vit_builds_no_graph_and_trains_the_rest(samples: list[dict]) -> None:
    m = build_model("tiny", seed=0).train()
    m.vit.requires_grad_(False)  # fix_vit
    inputs = row_inputs(samples[:1])
    out = m(**inputs, targets=inputs["input_ids"].roll(-1, 1))
    out.loss_sum.backward()
    assert all(p.grad is None for p in m.vit.parameters())
    assert m.vision_proj[0].weight.grad is not None and m.plora_sub_GN.grad is not None


def test_patch_embeddings_match_the_clip_convolution(model: IXCModel) -> None:
    clip = model.vit.vision_tower.vision_model
    conv_params = list(clip.embeddings.parameters())
    pixels = torch.randn(2, 3, 560, 560, generator=torch.Generator().manual_seed(0))
    expected = clip.embeddings(pixels)  # transformers: nn.Conv2d, class token, positions
    grads = torch.autograd.grad(expected.square().sum(), conv_params)
    got = patch_embeddings(clip.embeddings, pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(torch.autograd.grad(got.square().sum(), conv_params), grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="doesn't match model"):
        patch_embeddings(clip.embeddings, pixels[..., :280])
    # Under ZeRO-3 (partitioned parameters carry ds_id) the convolution module runs, so that
    # DeepSpeed gathers its weight first.
    calls = []
    hook = clip.embeddings.patch_embedding.register_forward_hook(lambda *_: calls.append(1))
    clip.embeddings.patch_embedding.weight.ds_id = 0
    try:
        torch.testing.assert_close(patch_embeddings(clip.embeddings, pixels), expected)
    finally:
        del clip.embeddings.patch_embedding.weight.ds_id
        hook.remove()
    assert calls == [1]


def test_query_runs_cut_merge_and_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    cu = torch.tensor([0, 10, 30, 40], dtype=torch.int32)
    # sample 0: runs [2, 4) and [8, 10); sample 1: none; sample 2: [33, 35)
    runs = attention.query_runs(torch.tensor([2, 3, 8, 9, 33, 34]), cu)
    assert runs is not None
    assert runs.index.tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 33, 34]  # gap of 4 <= MERGE_GAP: merged
    assert runs.cu_seqlens_q.tolist() == [0, 8, 10] and runs.cu_seqlens_k.tolist() == [0, 10, 15]
    assert runs.key_index.tolist() == [*range(0, 10), *range(30, 35)]
    assert (runs.max_seqlen_q, runs.max_seqlen_k) == (8, 10)
    monkeypatch.setattr(attention, "MERGE_GAP", 0)
    runs = attention.query_runs(torch.tensor([2, 3, 8, 9, 33, 34]), cu)
    assert runs is not None
    assert runs.index.tolist() == [2, 3, 8, 9, 33, 34]
    assert runs.cu_seqlens_q.tolist() == [0, 2, 4, 6] and runs.cu_seqlens_k.tolist() == [0, 4, 14, 19]
    assert runs.key_index.tolist() == [*range(0, 4), *range(0, 10), *range(30, 35)]
    # Every other position trained: one run per position would copy the prefix 10 times; capped
    # at MAX_KEY_COPIES, the sample becomes one run from its first to its last trained position.
    runs = attention.query_runs(torch.arange(10, 30, 2), cu)
    assert runs is not None
    assert runs.index.tolist() == list(range(10, 29)) and runs.key_index.tolist() == list(range(10, 29))
    assert attention.query_runs(torch.zeros(0, dtype=torch.long), cu) is None
    with pytest.raises(ValueError, match="ascend strictly"):
        attention.query_runs(torch.tensor([3, 2]), cu)


def test_query_runs_attend_like_rows_of_full_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(40, h, 8, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, 10, 30, 40], dtype=torch.int32)
    full = attention.varlen_attention(q, k, v, cu, 20, "sdpa")
    for gap in (0, 32):
        monkeypatch.setattr(attention, "MERGE_GAP", gap)
        runs = attention.query_runs(torch.tensor([0, 3, 8, 9, 12, 20, 21, 29, 39]), cu)
        assert runs is not None
        got = attention.attend_runs(q[runs.index], k, v, runs, "sdpa")
        torch.testing.assert_close(got, full[runs.index], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_layer_on_trained_rows_only_is_exact(samples: list[dict], checkpointing: bool) -> None:
    """The last layer's queries, wo and feed-forward at the trained positions only: the same loss,
    gradients and per-token losses as the whole row (eval: no dropout draws to line up)."""
    inputs = row_inputs(samples)
    t = inputs["input_ids"].shape[1]
    targets = torch.full((1, t), IGNORE_INDEX)
    starts = inputs["cu_seqlens"].tolist()
    trained = [starts[0] + 9, starts[0] + 10, starts[0] + 11, starts[1] - 1]  # sample 0: after the image
    trained += [starts[2] - 2, starts[3] - 4, starts[3] - 1]  # the text sample's end; sample 2
    targets[0, trained] = torch.arange(len(trained)) + 7
    results = []
    for rows_only in (False, True):
        m = build_model("tiny", seed=0, trained_rows_only=rows_only).eval()
        if checkpointing:
            m.gradient_checkpointing_enable()
        out = m(**inputs, targets=targets)
        (out.loss_sum / out.num_tokens).backward()
        assert (out.positions is not None) == rows_only
        assert out.hidden.shape[1] == (t if not rows_only else out.positions.numel())
        losses = row_token_losses(m.output, out, targets[0])
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        results.append((out.loss_sum.detach(), out.num_tokens, losses, grads))
    (loss_a, n_a, losses_a, grads_a), (loss_b, n_b, losses_b, grads_b) = results
    assert n_a == n_b == len(trained)
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(losses_b, losses_a)
    assert losses_a.nonzero().squeeze(1).tolist() == sorted(trained)
    assert grads_a.keys() == grads_b.keys() and any("layers.1.feed_forward" in n for n in grads_a)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_7b_keys_and_shapes_on_meta() -> None:
    m = build_model("7b", device="meta")
    sd = m.state_dict()
    assert len(sd) == 1904
    assert (
        sum(v.numel() for v in sd.values()) * 2 == 22_191_468_544
    )  # docs/IXC25.md#checkpoint-layout: bytes in bf16
    expect = {
        "model.tok_embeddings.weight": (92544, 4096),
        "output.weight": (92544, 4096),
        "model.norm.weight": (4096,),
        "model.layers.31.attention.wqkv.weight": (6144, 4096),
        "model.layers.0.attention.wqkv.Plora_A.weight": (256, 4096),
        "model.layers.0.attention.wqkv.Plora_B.weight": (6144, 256),
        "model.layers.0.attention.wqkv.lora_sft_A.weight": (256, 4096),
        "model.layers.0.attention.wo.lora_dpo_B.weight": (4096, 256),
        "model.layers.0.feed_forward.w1.lora_web_A.weight": (512, 4096),
        "model.layers.0.feed_forward.w2.weight": (4096, 14336),
        "model.layers.0.feed_forward.w2.lora_web_B.weight": (4096, 512),
        "model.layers.0.attention_norm.weight": (4096,),
        "model.layers.0.ffn_norm.weight": (4096,),
        "plora_glb_GN": (1, 1, 4096),
        "plora_sub_GN": (1, 1, 1, 4096),
        "vision_proj.0.weight": (4096, 4096),
        "vision_proj.0.bias": (4096,),
        "vision_proj.2.weight": (4096, 4096),
        "vit.vision_tower.vision_model.embeddings.position_embedding.weight": (1601, 1024),
        "vit.vision_tower.vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        "vit.vision_tower.vision_model.embeddings.class_embedding": (1024,),
        "vit.vision_tower.vision_model.pre_layrnorm.weight": (1024,),
        "vit.vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight": (4096, 1024),
        "vit.vision_tower.vision_model.post_layernorm.bias": (1024,),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    assert round(m.unused_adapter_numel() / 1e9, 2) == 2.42  # not parameters: no optimizer state
    assert num_parameters(m) + m.unused_adapter_numel() == 22_191_468_544 // 2


def test_unused_adapters_stay_on_cpu_in_stored_dtype(model: IXCModel) -> None:
    m = build_model("tiny", seed=0)
    names = {n for n, _ in m.named_parameters()}
    assert not any("lora_sft" in n or "lora_web" in n for n in names)
    m.to(torch.float64)  # .to()/.cuda() and DeepSpeed move parameters only
    unused = next(m.plora_linears()).unused_adapters
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in unused.values())
    assert "model.layers.0.attention.wqkv.lora_dpo_A.weight" in m.state_dict()
    m.set_unused_adapters_in_state_dict(False)
    assert not any("lora_dpo" in k for k in m.state_dict())


def test_image_tokens_follow_the_official_layout() -> None:
    c = 1  # one ViT channel holding the patch's identity: tile·10000 + row·100 + col
    grids = [(2, 3)]
    num = 1 + 6
    ids = (
        torch.arange(num)[:, None, None] * 10000 + torch.arange(40)[:, None] * 100 + torch.arange(40)[None, :]
    )
    merged = merge_patches(ids.reshape(num, 1600, c).float())
    assert merged[0, 3, 5].tolist() == [
        610,
        611,
        710,
        711,
    ]  # (y, x) = (3, 5): (2y,2x), (2y,2x+1), (2y+1,2x), (2y+1,2x+1)
    glb = torch.full((1, 1, 4), -1.0)
    sub = torch.full((1, 1, 1, 4), -2.0)
    tokens = assemble_image_tokens(merged, grids, glb, sub)
    assert tokens.shape[0] == image_token_count(2, 3)
    g = tokens[:420].reshape(20, 21, 4)
    assert (g[:, 20] == -2).all()
    assert g[2, 7, 0] == 4 * 100 + 14  # global view (tile 0), merged (2, 7) -> top-left patch (4, 14)
    assert (tokens[420] == -1).all()
    local = tokens[421:].reshape(40, 61, 4)
    assert (local[:, 60] == -2).all()
    # Local token (row 25, col 47) = tile (1, 2) (= tile index 5, stored after the global view: 6),
    # merged position (5, 7) -> top-left patch (10, 14).
    assert local[25, 47, 0] == 6 * 10000 + 10 * 100 + 14


def test_dynamic_ntk_matches_the_hf_formula() -> None:
    cfg = dataclasses.replace(preset_config("tiny"), max_position_embeddings=16)
    d, theta, factor = cfg.head_dim, cfg.rope_theta, 2.0
    for length in (10, 16, 40):
        base = theta if length <= 16 else theta * ((factor * length / 16) - (factor - 1)) ** (d / (d - 2))
        inv = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
        emb = torch.cat([torch.outer(torch.arange(length).float(), inv)] * 2, -1)
        pos = torch.arange(length)
        cos, sin = rotary_cos_sin(pos, cfg, torch.float32, torch.full((length,), length))
        torch.testing.assert_close(cos, emb.cos())
        torch.testing.assert_close(sin, emb.sin())
    # Packed: each sample uses its own length, so a short sample is unaffected by a long neighbour.
    pos = torch.cat([torch.arange(40), torch.arange(10)])
    lens = torch.tensor([40] * 40 + [10] * 10)
    cos, _ = rotary_cos_sin(pos, cfg, torch.float32, lens)
    torch.testing.assert_close(cos[40:], rotary_cos_sin(torch.arange(10), cfg, torch.float32)[0])
    x = torch.randn(3, 2, d)
    c3, s3 = rotary_cos_sin(torch.arange(3), cfg, torch.float32)
    assert apply_rotary(x, c3, s3)[0].equal(x[0])  # position 0 is not rotated


def test_generate_with_kv_cache_matches_recompute(model: IXCModel, samples: list[dict]) -> None:
    s = samples[0]
    prompt = s["ids"]
    grids, starts = torch.tensor(s["grids"]), torch.tensor(s["starts"])
    got = generate(model, prompt, s["tiles"], grids, starts, max_new_tokens=3, stop_ids=())
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(3):
            logits = model(
                ids[None], tiles=s["tiles"], image_grids=grids, image_starts=starts, return_logits=True
            ).logits
            ids = torch.cat([ids, logits[0, -1].argmax()[None]])
    assert got == ids[len(prompt) :].tolist()
    sampled = generate(
        model, prompt, s["tiles"], grids, starts, max_new_tokens=3, temperature=1.0, top_p=0.9, seed=0
    )
    assert len(sampled) <= 3


def test_module_names_match_the_official_checkpoint(model: IXCModel) -> None:
    from trainer.config import LORA_TARGETS

    names = {n for n, _ in model.named_modules()}
    # The trainer's default LoRA targets are exactly the five PLoRA linears of a layer.
    layer = model.model.layers[0]
    assert {n for n, m in layer.named_modules() if isinstance(m, PLoRALinear)} == set(LORA_TARGETS)
    for target in LORA_TARGETS:
        assert f"model.layers.0.{target}" in names
    assert "model.layers.0.attention.wqkv.Plora_A" in names
