"""Compressed hidden layers: the same math as masked, only the non-zeros stored, checkpoints
shared between layouts, the auto rule, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import cli, tiny_config
from spartune import layouts, sweep, train, transfer
from spartune.config import ConfigError, ModelConfig, ParamConfig, SearchDim, validate
from spartune.layouts import CompressedLinear, apply_layout, choose
from spartune.model import build_model
from spartune.sparsity import SparseLinear, random_mask

KINDS = ["per_row", "exact", "bernoulli"]


def _masked_layer(kind: str, bias: bool, density: float = 0.2) -> SparseLinear:
    mask = random_mask((24, 40), density, torch.Generator().manual_seed(1), kind)
    layer = SparseLinear(40, 24, role="hidden", bias=bias, density=density, mask=mask)
    layer.init_(0.3, torch.Generator().manual_seed(2))
    if bias:
        with torch.no_grad():
            layer.bias.normal_(generator=torch.Generator().manual_seed(3))
    return layer


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_single_layer_forward_and_gradients_equal_masked(kind, bias):
    masked = _masked_layer(kind, bias)
    comp = CompressedLinear.from_masked(masked)
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(4))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = masked(xa), comp(xb)
    assert yb.shape == ya.shape and yb.is_contiguous()
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(5))
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comp.values.grad, masked.weight.grad[masked.mask],
                               rtol=1e-5, atol=1e-5)
    # and the masked layer's gradient is the true gradient of X (W ⊙ M)^T
    w = masked.weight.detach().clone().requires_grad_(True)
    F.linear(x, w * masked.mask).backward(g)
    torch.testing.assert_close(comp.values.grad, w.grad[masked.mask], rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(comp.bias.grad, masked.bias.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_masks_positions_are_stored(kind):
    masked = _masked_layer(kind, bias=False, density=0.1)
    comp = CompressedLinear.from_masked(masked)
    nnz = int(masked.mask.sum())
    assert comp.values.numel() == nnz == comp.nonzero() == masked.nonzero()
    assert [p.numel() for p in comp.parameters()] == [nnz]  # no dense weight anywhere
    assert all(b.numel() <= max(nnz, 41) for b in comp.buffers())  # indices, not a dense mask
    assert torch.equal(comp.mask, masked.mask)
    dense = comp.dense_weight()
    assert (dense[~masked.mask] == 0).all()
    assert torch.equal(dense, masked.weight.detach())
    assert torch.equal(comp.values.detach(), masked.weight.detach()[masked.mask])


def test_a_row_or_a_whole_layer_without_non_zeros_is_fine():
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[2, 1] = mask[4, 0] = True  # empty rows and columns (bernoulli can give them)
    comp = CompressedLinear(5, 6, mask)
    x = torch.randn(7, 5, requires_grad=True)
    comp(x).sum().backward()
    assert comp.values.grad.shape == (2,) and x.grad.shape == x.shape


def _model(impl: str, *, density: float = 0.25, seed: int = 0, mask_seed: int = 0,
           width: int = 64, **kw) -> nn.Module:
    m = ModelConfig(width=width, base_width=32, head_size=16, density=density,
                    sparse_impl=impl, **kw)
    return build_model(m, ParamConfig(name="supar"), vocab_size=32, max_len=16, seed=seed,
                       mask_seed=mask_seed)


def test_compressed_model_starts_from_the_masked_models_init():
    a, b = _model("masked"), _model("compressed")
    assert {layouts.impl_of(layer) for layer in b.hidden_layers()} == {"compressed"}
    for la, lb in zip(a.hidden_layers(), b.hidden_layers(), strict=True):
        assert torch.equal(la.weight.detach(), lb.dense_weight())
    assert a.n_params() == b.n_params() and a.n_nonzero_params() == b.n_nonzero_params()
    x = torch.randint(0, 32, (2, 16))
    torch.testing.assert_close(b(x, x)[1], a(x, x)[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", [
    "per_row", pytest.param("exact", marks=pytest.mark.slow),
    pytest.param("bernoulli", marks=pytest.mark.slow)])
def test_compressed_and_masked_runs_give_the_same_loss_curve(kind):
    """50 fp32 steps with weight decay, clipping and the LR schedule: within 1e-4 relative,
    per-layer densities included; AdamW holds state for the non-zeros only."""
    def cfg(impl):
        return tiny_config(model__sparse_impl=impl, model__density=0.25, model__mask_kind=kind,
                           model__layer_density={"mlp_up": 0.125}, train__steps=50,
                           train__eval_every=1, train__eval_batches=1, optim__lr=0.02)

    masked, comp = train.run(cfg("masked")), train.run(cfg("compressed"))
    for key in ("train_loss", "val_loss"):
        a = torch.tensor([r[key] for r in masked["curve"]], dtype=torch.float64)
        b = torch.tensor([r[key] for r in comp["curve"]], dtype=torch.float64)
        assert len(a) == len(b) == 50
        assert ((a - b).abs() / a.abs()).max().item() < 1e-4, key
    assert masked["curve"][-1]["train_loss"] < masked["curve"][0]["train_loss"] - 0.2
    by_name = {r["name"]: r for r in comp["hidden_layers"]}
    assert {r["impl"] for r in comp["hidden_layers"]} == {"compressed"}
    assert {r["impl"] for r in masked["hidden_layers"]} == {"masked"}
    for r in masked["hidden_layers"]:
        c = by_name[r["name"]]
        assert c["nnz"] == r["nnz"] and c["density"] == r["density"]
        # exp_avg + exp_avg_sq for the values (+ AdamW's step counter)
        assert 8 * c["nnz"] <= c["optimizer_bytes"] <= 8 * c["nnz"] + 16
    assert comp["hidden_optimizer_bytes"] < 0.25 * masked["hidden_optimizer_bytes"]


def test_compressed_and_masked_weights_agree_after_training_with_weight_decay():
    def trained(impl):
        torch.manual_seed(0)
        model = _model(impl, density=0.25)
        groups = model.param_groups(0.1)
        opt = torch.optim.AdamW(groups, lr=0.02)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randint(0, 32, (4, 16), generator=gen)
            _, loss = model(x, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        return model

    a, b = trained("masked"), trained("compressed")
    for la, lb in zip(a.hidden_layers(), b.hidden_layers(), strict=True):
        w = la.weight.detach()
        assert (w[~la.mask] == 0).all()
        # Adam's g / sqrt(v) amplifies the last-bit differences of near-zero gradients on a
        # few entries; the layer as a whole must agree.
        rel = (lb.values.detach() - w[la.mask]).norm() / w[la.mask].norm()
        assert rel < 1e-4, rel


def test_a_checkpoint_saved_under_compressed_loads_under_masked_and_back(tmp_path):
    src = _model("compressed", seed=0, mask_seed=1, bias=True)
    with torch.no_grad():
        for layer in src.hidden_layers():
            layer.values.mul_(1.5)  # a trained-looking state, not the init
            layer.bias.normal_()
    torch.save(src.state_dict(), tmp_path / "c.pt")
    sd = torch.load(tmp_path / "c.pt", weights_only=True)
    assert sum(k.endswith(".weight_mask") for k in sd) == 8 and not any("values" in k for k in sd)

    masked = _model("masked", seed=5, mask_seed=2, bias=True)  # other init, other masks
    masked.load_state_dict(sd)
    for ls, lm in zip(src.hidden_layers(), masked.hidden_layers(), strict=True):
        assert torch.equal(lm.mask, ls.mask)
        assert torch.equal(lm.weight.detach(), ls.dense_weight())
        assert torch.equal(lm.bias.detach(), ls.bias.detach())
    torch.save(masked.state_dict(), tmp_path / "m.pt")

    back = _model("compressed", seed=7, mask_seed=3, bias=True)
    back.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    for ls, lb in zip(src.hidden_layers(), back.hidden_layers(), strict=True):
        assert torch.equal(lb.values.detach(), ls.values.detach())
        assert torch.equal(lb.mask, ls.mask)
    x = torch.randint(0, 32, (2, 16))
    torch.testing.assert_close(back(x, x)[1], src(x, x)[1], rtol=0, atol=0)
    torch.testing.assert_close(masked(x, x)[1], src(x, x)[1], rtol=1e-6, atol=1e-6)


def test_strict_load_reports_missing_and_unexpected_keys():
    model = _model("compressed")
    sd = model.state_dict()
    key = next(k for k in sd if k.endswith("mlp.up.weight_mask"))
    broken = {k: v for k, v in sd.items() if k != key}
    broken[key.replace(".weight_mask", ".values")] = torch.zeros(3)
    res = model.load_state_dict(broken, strict=False)
    assert key in res.missing_keys
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict(broken)


def test_converting_there_and_back_is_exact():
    model = _model("masked", density=0.125)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = apply_layout(model, "compressed")
    assert set(chosen.values()) == {"compressed"} and len(chosen) == 8
    layouts.to_masked(model)
    assert {layouts.impl_of(layer) for layer in model.hidden_layers()} == {"masked"}
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compressed_resumes_from_its_checkpoint_with_the_same_final_loss(tmp_path, caplog):
    cfg = tiny_config(model__density=0.25, model__sparse_impl="compressed", train__steps=12,
                      train__checkpoint_every=4, train__eval_every=4)
    whole = train.run(cfg, out_dir=tmp_path / "whole")

    def crash(step, loss):
        if step == 12:  # the last save was at step 8
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        train.run(cfg, crash, out_dir=tmp_path / "resumed")
    reported: list[int] = []
    with caplog.at_level("INFO", logger="spartune.train"):
        resumed = train.run(cfg, lambda step, loss: reported.append(step),
                            out_dir=tmp_path / "resumed")
    assert reported == [12]  # resumed at step 8, not restarted (which reports 4, 8, 12)
    assert any(r.getMessage().endswith("at step 8") for r in caplog.records
               if "resumed from" in r.getMessage())
    assert resumed["final_val_loss"] == whole["final_val_loss"]


def test_per_layer_density_under_compressed_keeps_dense_layers_masked():
    model = _model("compressed", density=1.0, layer_density={"mlp_up": 0.25})
    got = {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]: layouts.impl_of(layer)
           for name, layer in model.named_modules()
           if isinstance(layer, SparseLinear | CompressedLinear)}
    assert got == {"attn.qkv": "masked", "attn.proj": "masked", "mlp.up": "compressed",
                   "mlp.down": "masked"}
    mults = {g["lr_mult"] for g in model.param_groups(0.1)}
    assert 1 / (2 * 0.25) in mults  # SμPar's own m_rho for the compressed layer


def test_parameters_are_plain_dense_parameters_and_ddp_can_wrap_the_model(tmp_path):
    """Nothing in a compressed layer stops DDP: ordinary dense nn.Parameters, int buffers."""
    import torch.distributed as dist

    model = _model("compressed")
    assert all(type(p) is nn.Parameter and p.layout == torch.strided
               for p in model.parameters())
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randint(0, 32, (2, 16))
        _, loss = ddp(x, x)
        loss.backward()
        assert all(layer.values.grad is not None for layer in model.hidden_layers())
    finally:
        dist.destroy_process_group()


# -- the auto rule ---------------------------------------------------------------------------


def test_auto_rule():
    big = (4096, 1024)
    assert choose(big, 1.0) == "masked"
    assert choose(big, 1 / 64) == "compressed"
    assert choose(big, 1 / 4) == "masked"  # dense BLAS wins at moderate sparsity
    assert choose((128, 128), 1 / 64) == "masked"  # too small for the sparse kernels' cost
    assert choose(big, 1 / 64, "cuda") == "masked"  # not measured there: keep masked


def test_auto_builds_a_mixed_model_by_the_rule():
    model = _model("auto", width=512, density=1 / 64)
    for layer in model.hidden_layers():
        expected = choose((layer.out_features, layer.in_features), layer.density)
        assert layouts.impl_of(layer) == expected
    assert {layouts.impl_of(layer) for layer in model.hidden_layers()} == {"masked",
                                                                          "compressed"}
    x = torch.randint(0, 32, (2, 16))
    ref = _model("masked", width=512, density=1 / 64)
    torch.testing.assert_close(model(x, x)[1], ref(x, x)[1], rtol=1e-5, atol=1e-5)


def _auto_targets(tmp_path):
    cfg = tiny_config(results_dir=str(tmp_path), train__steps=4, train__eval_every=2,
                      train__batch_size=2, train__seq_len=16, model__sparse_impl="auto")
    cfg.study.name, cfg.study.sampler = "proxy", "grid"
    cfg.study.widths, cfg.study.densities = [32], [1.0]
    cfg.study.space = {"lr": SearchDim(values=[2**-8, 2**-6])}
    return cfg


@pytest.mark.slow
def test_a_sweep_and_a_transfer_with_auto_complete(tmp_path):
    cfg = _auto_targets(tmp_path)
    cfg.study.widths, cfg.study.densities = [32, 512], [1.0, 1 / 64]  # 512 @ 1/64: compressed
    res = sweep.sweep(cfg)
    assert res["finished"] == res["total"] == 8
    proxy = _auto_targets(tmp_path)
    proxy.study.name = "proxy_small"
    sweep.sweep(proxy)
    t = proxy.transfer
    t.source, t.params, t.widths, t.densities, t.hps = "proxy_small", ["supar"], [512], \
        [1.0, 1 / 64], ["lr"]
    proxy.study.name = "targets"
    out = transfer.run(proxy)
    done = out["trials"][out["trials"]["role"] == "target"]
    assert len(done) == 2 and set(done["state"]) == {"COMPLETE"}
    assert all(math.isfinite(v) for v in done["final_val_loss"])


# -- bad input --------------------------------------------------------------------------------


def test_compressed_at_density_one_and_an_unknown_layout_are_config_errors():
    with pytest.raises(ConfigError, match="nothing to compress") as e:
        validate(tiny_config(model__sparse_impl="compressed"))
    assert e.value.field == "model.sparse_impl" and "masked or auto" in str(e.value)
    with pytest.raises(ConfigError, match="choose one of masked, compressed, auto") as e:
        validate(tiny_config(model__sparse_impl="csr"))
    assert e.value.field == "model.sparse_impl"
    validate(tiny_config(model__sparse_impl="compressed", model__layer_density={"qkv": 0.5}))
    with pytest.raises(ValueError, match="nothing to compress"):
        CompressedLinear.from_masked(SparseLinear(4, 4, role="hidden"))


@pytest.mark.parametrize("value, message", [
    ("compressed", "nothing to compress at density 1 (every hidden layer is dense); use "
                   "model.sparse_impl=masked or auto"),
    ("dense", "unknown implementation 'dense'; choose one of masked, compressed, auto"),
])
def test_bad_sparse_impl_on_the_command_line_is_one_line(workdir, value, message):
    r = cli("spartune-train", f"model.sparse_impl={value}", "data=synthetic", "train=smoke",
            cwd=workdir)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"spartune: error: model.sparse_impl: {message}"]
    assert not (workdir / "results").exists() or not any((workdir / "results").rglob("*.json"))


def test_train_command_prints_and_records_each_layers_layout(workdir):
    r = cli("spartune-train", "model.sparse_impl=compressed", "model.density=0.25",
            "data=synthetic", "train=smoke", "train.device=cpu", cwd=workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "hidden layer " in ln]
    assert len(lines) == 4 * 2 and all(": compressed," in ln for ln in lines)
    (metrics,) = workdir.rglob("metrics.json")
    saved = json.loads(metrics.read_text())
    assert saved["sparse_impl"] == "compressed"
    assert [row["impl"] for row in saved["hidden_layers"]] == ["compressed"] * 8
    assert saved["hidden_param_bytes"] > 0 and saved["hidden_optimizer_bytes"] > 0
