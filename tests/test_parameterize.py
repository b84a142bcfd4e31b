"""`spartune.parameterize` on a model spartune did not build (the example's HF-style GPT-2), and
the built-in GPT through the same path: the rule table's numbers, masks that stay exactly zero,
state that survives a round trip, and one clear line for each wiring mistake."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import spartune
from conftest import ROOT, tiny_config
from own_model import model as ex
from spartune.config import ConfigError

SIGMA = 0.05


def _example(width=256, base_width=32, density=0.25, param="supar", **kw):
    return ex.build(width, base_width=base_width, param=param, density=density,
                    init_std=SIGMA, alpha_output=2.0, seed=0, **kw)


def test_roles_are_inferred_from_shapes_against_the_base():
    _, sm = _example()
    roles = dict(zip(sm.table()["name"], sm.table()["role"], strict=True))
    assert roles["transformer.wte.weight"] == roles["transformer.wpe.weight"] == "embedding"
    assert roles["lm_head.weight"] == "output"
    for kind in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert roles[f"transformer.h.1.{kind}.weight"] == "hidden"
        assert roles[f"transformer.h.1.{kind}.bias"] == "bias"
    assert roles["transformer.h.0.ln_1.weight"] == "norm"
    assert roles["transformer.ln_f.bias"] == "bias"


def test_table_gives_the_supar_rules_on_the_example():
    model, sm = _example()
    m_d, m_rho, depth = 256 / 32, 0.25, 2
    t = sm.table().set_index("name")
    params = dict(model.named_parameters())
    hidden = t[t["role"] == "hidden"]
    assert len(hidden) == 4 * depth
    for name, row in hidden.iterrows():
        expected = SIGMA / math.sqrt(m_d * m_rho)
        if name.endswith("c_proj.weight"):
            expected /= math.sqrt(2 * depth)  # residual projections: GPT-2's factor
        assert row["init_std"] == pytest.approx(expected, rel=1e-12)
        w = params[name]
        mod = model.get_submodule(name.rsplit(".", 1)[0])
        kept = w[mod.weight_mask]
        assert kept.std().item() == pytest.approx(expected, rel=0.05), name  # measured
        assert row["lr_mult"] == pytest.approx(1 / (m_d * m_rho))
        masked = 1 - mod.weight_mask.float().mean().item()
        assert masked == pytest.approx(1 - 0.25, abs=0.01)
        assert (w[~mod.weight_mask] == 0).all()
    emb = t[t["role"] == "embedding"]
    assert (emb["lr_mult"] == 1.0).all() and (emb["forward_mult"] == 1.0).all()
    assert params["transformer.wte.weight"].std().item() == pytest.approx(SIGMA, rel=0.05)
    assert t.loc["lm_head.weight", "forward_mult"] == pytest.approx(2.0 / m_d)
    assert t.loc["lm_head.weight", "lr_mult"] == 1.0
    assert sm.attention_scale(16) == 1 / 16


def test_sp_keeps_every_multiplier_at_one_and_sqrt_attention():
    _, sm = _example(param="sp")
    t = sm.table()
    assert (t["lr_mult"] == 1.0).all()
    assert t.loc[t["role"] == "output", "forward_mult"].item() == 2.0  # alpha, not / m_d
    assert sm.attention_scale(16) == 0.25


def test_readout_multiplier_is_applied_in_the_forward_pass():
    torch.manual_seed(0)
    model, sm = _example(width=64, density=1.0)
    idx = torch.randint(0, 256, (2, 8))
    logits, _ = model(idx)
    h = model.transformer.ln_f(_hidden(model, idx))
    plain = nn.functional.linear(h, model.lm_head.weight)
    assert torch.allclose(logits, plain * sm.output_mult)
    assert sm.output_mult == pytest.approx(2.0 * 32 / 64)


def _hidden(model, idx):
    pos = torch.arange(idx.shape[1])
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)
    for block in model.transformer.h:
        x = block(x)
    return x


def test_param_groups_are_plain_dicts_with_lr_and_lr_mult():
    model, sm = _example()
    groups = sm.param_groups(lr=1e-2, weight_decay=0.1)
    assert {frozenset(g) for g in groups} == {frozenset({"params", "lr", "lr_mult",
                                                          "weight_decay"})}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    for g in groups:
        assert g["lr"] == pytest.approx(1e-2 * g["lr_mult"])
        if g["weight_decay"]:
            assert g["lr"] * g["weight_decay"] == pytest.approx(1e-2 * 0.1)  # independent
    coupled = sm.param_groups(lr=1e-2, weight_decay=0.1, wd_independent=False)
    assert {g["weight_decay"] for g in coupled} == {0.0, 0.1}


class _Tied(nn.Module):
    """A tied embedding / readout the HF way: lm_head.weight is wte.weight."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, width)
        self.fc = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, 50, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        return self.lm_head(self.ln(self.fc(self.wte(idx))))


def test_tied_weights_are_one_parameter_in_one_group_and_the_readout_is_scaled():
    model = _Tied(128)
    base = _Tied(32)
    sm = spartune.parameterize(model, base=base, param="mup", alpha_input=3.0,
                               alpha_output=2.0)
    groups = sm.param_groups(lr=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert ids.count(id(model.wte.weight)) == 1
    t = sm.table().set_index("name")
    assert t.loc["wte.weight", "role"] == "embedding"
    assert t.loc["lm_head.weight", "tied_to"] == "wte.weight"
    assert t.loc["lm_head.weight", "forward_mult"] == pytest.approx(2.0 / 4)
    idx = torch.randint(0, 50, (2, 5))
    h = model.ln(model.fc(3.0 * nn.functional.embedding(idx, model.wte.weight)))
    expected = nn.functional.linear(h, model.wte.weight) * 0.5
    assert torch.allclose(model(idx), expected, atol=1e-6)


def _masked_train(model, sm, steps=5):
    opt = torch.optim.AdamW(sm.param_groups(lr=0.05, weight_decay=0.1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 256, (4, 16), generator=gen)
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _assert_masked_zero(sm):
    n = 0
    for _, mod, w in sm.hidden():
        m = mod.weight_mask
        assert (w[~m] == 0).all()
        assert (w[m] != 0).float().mean() > 0.99
        n += 1
    assert n == 8


def test_masked_weights_stay_exactly_zero_after_adamw_steps():
    model, sm = _example(width=64, density=0.25)
    opt = _masked_train(model, sm)
    _assert_masked_zero(sm)
    for _, mod, w in sm.hidden():
        assert (opt.state[w]["exp_avg"][~mod.weight_mask] == 0).all()


def test_state_dict_round_trip_restores_masks_and_zeros():
    model, sm = _example(width=64, density=0.25)
    _masked_train(model, sm)
    sd = model.state_dict()
    assert sum(k.endswith(".weight_mask") for k in sd) == 8
    fresh, sm2 = ex.build(64, base_width=32, density=0.25, seed=7)  # other masks, other init
    assert not torch.equal(fresh.transformer.h[0].mlp.c_fc.weight_mask,
                           sd["transformer.h.0.mlp.c_fc.weight_mask"])
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    _assert_masked_zero(sm2)
    _masked_train(fresh, sm2, steps=2)
    _assert_masked_zero(sm2)


def test_a_loaded_state_with_nonzero_masked_entries_is_rezeroed():
    model, sm = _example(width=64, density=0.25)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["transformer.h.0.mlp.c_fc.weight"].fill_(1.0)
    model.load_state_dict(sd)
    _assert_masked_zero(sm)


def test_ddp_keeps_masked_gradients_zero(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        model, sm = _example(width=64, density=0.25)
        ddp = DDP(model)
        idx = torch.randint(0, 256, (2, 16))
        _, loss = ddp(idx, idx)
        loss.backward()
        for _, mod, w in sm.hidden():
            assert (w.grad[~mod.weight_mask] == 0).all()
            assert (w.grad[mod.weight_mask] != 0).any()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_masked_weights_stay_zero_under_torch_compile():
    model, sm = _example(width=64, density=0.25)
    compiled = torch.compile(model)
    opt = torch.optim.AdamW(sm.param_groups(lr=0.05, weight_decay=0.1))
    idx = torch.randint(0, 256, (4, 16))
    for _ in range(3):
        _, loss = compiled(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _assert_masked_zero(sm)
    eager, _ = model(idx, idx)
    assert torch.allclose(compiled(idx, idx)[0], eager, atol=1e-4)  # hooks traced, not lost


# -- the built-in GPT through the same path: what the code before it gave (state bit for bit) ---

FIXTURE = json.loads((Path(__file__).parent / "data" / "gpt_losses.json").read_text())
LOSS_RTOL = 5e-6  # 16x the measured spread across CPU kernels, below a 1e-4 change of the LR


@pytest.mark.parametrize("case", sorted(FIXTURE["cases"]))
def test_builtin_gpt_trains_as_the_code_before_parameterize(case):
    from spartune import train
    from spartune.model import build_model

    c = FIXTURE["cases"][case]
    cfg = tiny_config(train__steps=12, train__eval_every=4, **c["over"])
    model = build_model(cfg.model, cfg.param, vocab_size=64, max_len=32, seed=cfg.seed,
                        mask_seed=cfg.mask_seed)
    sha = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16]
           for k, v in model.state_dict().items()}
    assert sha == c["state_sha"]  # same masks, same initial weights, bit for bit
    names = {id(p): n for n, p in model.named_parameters()}
    groups = model.param_groups(0.1, wd_independent=cfg.optim.wd_independent_of_lr_mult)
    assert sorted([names[id(p)], float(g["lr_mult"]).hex(), float(g["weight_decay"]).hex()]
                  for g in groups for p in g["params"]) == c["groups"]
    assert [float(v).hex() for v in (model.embed.mult, model.unembed.mult,
                                     model.blocks[0].attn.scale)] == c["mults"]
    # The losses cannot be compared bit for bit on every CPU: the fixture was recorded on one
    # AMD EPYC, and another x86 CPU (or ARM) runs other vectorised kernels and MKL code paths that
    # sum in another order. LOSS_RTOL is derived from that spread, measured on this fixture with
    # the current code by forcing each of ATen's CPU kernel paths (ATEN_CPU_CAPABILITY=default,
    # avx2, avx512, and 2 threads; tests/data/gpt_losses_spread.py prints the table again on
    # any machine): the worst relative difference from the recorded losses was
    # 3.1e-7 (scalar kernels; 0.9e-7 for avx2/avx512), and an Intel Xeon's reported difference is
    # two float32 ulps (~1e-7). A change of the training path is far larger: scaling the LR by
    # 1.0001 moves every case's losses by 1.1e-5 to 6.7e-5 relative, by 1.001 by 1.1e-4 to 6.9e-4.
    # The initial weights, masks, LR groups and multipliers above stay exact on every CPU.
    threads = torch.get_num_threads()
    cfg.train.threads = FIXTURE["threads"]  # fewer reduction orders to differ in
    try:
        m = train.run(cfg)
    finally:
        torch.set_num_threads(threads)
    recorded = {"train": [float.fromhex(h) for h in c["train"]],
                "val": [float.fromhex(h) for h in c["val"]]}
    got = {"train": [float(r["train_loss"]) for r in m["curve"]],
           "val": [float(r["val_loss"]) for r in m["curve"]]}
    for kind in ("train", "val"):
        assert got[kind] == pytest.approx(recorded[kind], rel=LOSS_RTOL, abs=0), kind


def test_builtin_gpt_table_comes_from_the_same_function():
    from spartune.model import build_model

    cfg = tiny_config(model__width=64, model__density=0.5)
    model = build_model(cfg.model, cfg.param, vocab_size=64, max_len=32, seed=0, mask_seed=0)
    sm = model.parameterization
    assert spartune.parameterization(model) is sm
    t = sm.table()
    assert set(t.loc[t["role"] == "hidden", "lr_mult"]) == {1 / (2 * 0.5)}
    assert t.loc[t["tied_to"] != "", "name"].tolist() == ["unembed.weight"]


# -- bad input: one line each -------------------------------------------------------------------


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_base_at_the_same_width_cannot_tell_what_scales():
    model = ex.GPT2LMHeadModel(ex.GPT2Config(n_embd=64))
    base = ex.GPT2LMHeadModel(ex.GPT2Config(n_embd=64))
    with pytest.raises(ConfigError) as e:
        spartune.parameterize(model, base=base)
    assert e.value.field == "base" and "delta=" in _one_line(e)


class _Odd(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(10, width)
        self.mix = nn.Parameter(torch.zeros(8, 8))  # fixed size: no width-like dim
        self.out = nn.Linear(width, 10)


def test_a_role_that_cannot_be_inferred_names_the_override():
    base = _Odd(16)
    with pytest.raises(ConfigError) as e:
        spartune.parameterize(_Odd(32), base=base)
    assert "mix" in _one_line(e) and "roles={'mix': 'hidden'}" in str(e.value)
    sm = spartune.parameterize(_Odd(32), base=base, roles={"mix": "hidden"})
    assert sm.table().set_index("name").loc["mix", "role"] == "hidden"


def test_a_density_glob_that_matches_nothing_is_an_error():
    with pytest.raises(ConfigError) as e:
        _example(density={"transformer.h.*.mlp.c_fcc": 0.25})
    assert e.value.field == "density.transformer.h.*.mlp.c_fcc"
    assert "transformer.h.*.mlp.c_fc" in _one_line(e)  # the names it could have meant


def test_density_per_layer_glob():
    model, sm = _example(density={"transformer.h.*.mlp.*": 0.25})
    t = sm.table().set_index("name")
    assert t.loc["transformer.h.0.mlp.c_fc.weight", "density"] == 0.25
    assert t.loc["transformer.h.0.attn.c_attn.weight", "density"] == 1.0
    assert not hasattr(model.transformer.h[0].attn.c_attn, "weight_mask")


@pytest.mark.parametrize("kw, field", [
    ({"roles": {"lm_head.weight": "readout"}}, "roles.lm_head.weight"),
    ({"roles": {"nothing.*": "hidden"}}, "roles.nothing.*"),
    ({"param": "mupp"}, "param"),
    ({"density": 0.0}, "density"),
    ({"sparse_impl": "csr"}, "sparse_impl"),
    ({"sparse_impl": {"*.c_fc": "dense"}}, "sparse_impl.*.c_fc"),
    ({"mask_kind": "rows"}, "mask_kind"),
])
def test_bad_arguments_are_one_line_naming_the_argument(kw, field):
    args = {"density": 0.5, **kw}
    with pytest.raises(ConfigError) as e:
        _example(**args)
    assert e.value.field == field
    _one_line(e)


def test_parameterizing_twice_is_refused():
    model, _ = _example(width=64)
    base = ex.GPT2LMHeadModel(ex.GPT2Config(n_embd=32))
    with pytest.raises(ConfigError, match="already parameterized"):
        spartune.parameterize(model, base=base)


def test_a_base_on_the_meta_device_gives_the_same_parameterization():
    with torch.device("meta"):
        base = ex.GPT2LMHeadModel(ex.GPT2Config(n_embd=32))
    model = ex.GPT2LMHeadModel(ex.GPT2Config(n_embd=128))
    sm = spartune.parameterize(model, base=base, density=0.5, depth=2,
                               residual=["transformer.h.*.attn.c_proj", "*.mlp.c_proj"])
    _, ref = ex.build(128, base_width=32, density=0.5)
    cols = ["name", "role", "init_std", "lr_mult", "forward_mult"]
    assert sm.table()[cols].equals(ref.table()[cols])


def test_sparse_impl_auto_is_the_masked_layout_for_now():
    _, sm = _example(sparse_impl="auto")
    assert set(sm.table().query("role == 'hidden'")["layout"]) == {"masked"}


def test_import_spartune_imports_no_torch_hydra_or_optuna():
    code = ("import sys, spartune; print(spartune.__version__); "
            "print(sorted(m for m in ('torch', 'hydra', 'optuna', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.split("\n")
    assert out[0] and out[1] == "[]"


def test_a_whole_parameterized_model_pickles(tmp_path):
    from spartune.model import build_model

    cfg = tiny_config(model__density=0.5)
    model = build_model(cfg.model, cfg.param, vocab_size=64, max_len=32, seed=0, mask_seed=0)
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
