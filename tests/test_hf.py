"""Hugging Face models as they are written (transformers 5.x, built from small configs, nothing
downloaded): GPT-2's Conv1D (weights (in, out)), Llama tied and untied, a GQA Llama, a BERT
encoder. Masks count inputs per *output* neuron, m_d is a fan-in ratio, the rule table's numbers
arrive, attention scales are set, checkpoints keep their masks, and the coordinate check taps
HF attention modules."""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import spartune  # noqa: E402
from conftest import ROOT  # noqa: E402
from spartune import parameterizer  # noqa: E402
from spartune.config import ConfigError  # noqa: E402
from spartune.params import layer_scale  # noqa: E402

sys.path.insert(0, str(ROOT / "examples" / "hf_gpt2"))
import hf_model as hf  # noqa: E402

HIDDEN = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
SIGMA = 0.02


def _rows(sm):
    return {r.name: r for r in sm.rows}


def _fan_in_counts(mod: nn.Module, fan_in_dim: int) -> torch.Tensor:
    """Non-zero inputs of every output neuron of a masked layer."""
    return mod.weight_mask.sum(fan_in_dim)


# -- GPT-2: Conv1D (in, out) ----------------------------------------------------------------


def test_gpt2_masks_keep_round_rho_d_in_inputs_per_output_neuron():
    model, sm = hf.build(128, base_width=32, density=1 / 32)
    rows = _rows(sm)
    for kind in HIDDEN:
        name = f"transformer.h.1.{kind}"
        r = rows[f"{name}.weight"]
        assert r.role == "hidden" and r.fan_in_dim == 0  # Conv1D: (in, out)
        mod = model.get_submodule(name)
        d_in = mod.weight.shape[0]
        counts = _fan_in_counts(mod, 0)
        assert counts.numel() == mod.nf  # one count per output neuron
        assert (counts == round(d_in / 32)).all(), (kind, counts.min(), counts.max())
    assert set(sm.table()["fan_in_dim"]) >= {0}


def test_gpt2_roles_tied_readout_multiplier_and_lr_vs_the_rule_table():
    model, sm = hf.build(128, base_width=32, density=0.25, alpha_output=2.0)
    rows = _rows(sm)
    assert rows["transformer.wte.weight"].role == rows["transformer.wpe.weight"].role == \
        "embedding"
    head = rows["lm_head.weight"]
    assert head.role == "output" and head.tied_to == "transformer.wte.weight"
    assert head.width_mult == 4.0 and head.forward_mult == 2.0 / 4
    for kind in HIDDEN:
        r = rows[f"transformer.h.0.{kind}.weight"]
        s = layer_scale("supar", "hidden", width_mult=4.0, density_mult=0.25,
                        residual_depth=2 if kind.endswith("c_proj") else None)
        assert r.width_mult == 4.0 and r.lr_mult == s.lr and r.init_std == SIGMA * s.init
    assert rows["transformer.h.0.ln_1.weight"].role == "norm"
    # the readout's multiplier is in the forward pass: logits = mult * h W^T
    x = torch.randint(0, 256, (2, 8))
    captured = {}

    def keep_input(module, inputs, output):
        captured["h"] = inputs[0]

    model.lm_head.register_forward_hook(keep_input)
    logits = model(x).logits
    assert torch.allclose(logits, 0.5 * captured["h"] @ model.transformer.wte.weight.T,
                          atol=1e-5)


def test_unequal_mlp_takes_m_d_from_each_layers_fan_in():
    # width 256 with n_inner 1024 against a base of width 64 with n_inner 512: c_fc's fan-in
    # grows 4x (LR x 1/4), c_proj's 2x (LR x 1/2); read from dim 1 they would be swapped
    model, sm = hf.build(256, base_width=64, n_inner=1024, base_n_inner=512, density=0.5,
                         init_std=SIGMA)
    rows = _rows(sm)
    fc, proj = rows["transformer.h.0.mlp.c_fc.weight"], rows["transformer.h.0.mlp.c_proj.weight"]
    assert (fc.width_mult, proj.width_mult) == (4.0, 2.0)
    assert (fc.lr_mult, proj.lr_mult) == (0.25 / 0.5, 0.5 / 0.5)  # / m_rho too (SμPar)
    assert fc.lr_mult == layer_scale("supar", "hidden", width_mult=4.0, density_mult=0.5).lr
    # init std of the non-zeros: sigma / sqrt(m_d m_rho) (and 1/sqrt(2 depth) on c_proj)
    for r, want in [(fc, SIGMA / math.sqrt(4 * 0.5)),
                    (proj, SIGMA / math.sqrt(2 * 0.5) / math.sqrt(4))]:
        assert r.init_std == pytest.approx(want)
        w = model.get_submodule(r.module).weight
        nz = w[w != 0]
        assert nz.numel() == w.numel() // 2
        assert float(nz.detach().std()) == pytest.approx(want, rel=0.03)
    dense, dsm = hf.build(256, base_width=64, n_inner=1024, base_n_inner=512, param="mup")
    drows = _rows(dsm)
    assert drows["transformer.h.0.mlp.c_fc.weight"].lr_mult == 0.25
    assert drows["transformer.h.0.mlp.c_proj.weight"].lr_mult == 0.5


def test_masked_entries_and_adam_moments_stay_exactly_zero():
    model, sm = hf.build(64, base_width=32, density=0.25)
    opt = torch.optim.AdamW(sm.param_groups(1e-2, weight_decay=0.1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(0, 256, (4, 16), generator=gen)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    n = 0
    for _, mod, w in sm.hidden():
        m = mod.weight_mask
        assert (w[~m] == 0).all() and (w[m] != 0).all()
        state = opt.state[w]
        assert (state["exp_avg"][~m] == 0).all() and (state["exp_avg_sq"][~m] == 0).all()
        n += 1
    assert n == 8


def test_attention_auto_sets_hf_scaling_and_says_how_many(caplog):
    with caplog.at_level(logging.INFO, logger="spartune.parameterizer"):
        model, sm = hf.build(64, base_width=32)
    attn = [model.transformer.h[i].attn for i in range(2)]
    assert [a.scaling for a in attn] == [1 / 16, 1 / 16]
    assert sm.attention_modules == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert "on 2 module(s)" in caplog.text
    sp, _ = hf.build(64, base_width=32, param="sp")
    assert sp.transformer.h[0].attn.scaling == 0.25
    kept, ksm = hf.build(64, base_width=32, attention="none")
    assert kept.transformer.h[0].attn.scaling == 0.25 and ksm.attention_modules == []
    parameterizer._WARNED.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spartune.parameterizer"):
        spartune.parameterize(_Toy(64), base=_Toy(32), fan_in={"mid.w": 0})  # no HF attention
    assert "found no module exposing `scaling`" in caplog.text
    with pytest.raises(ConfigError) as e:
        hf.build(64, base_width=32, attention="sometimes")
    assert e.value.field == "attention"


def test_few_weights_per_neuron_warns_for_any_model(caplog):
    parameterizer._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="spartune.parameterizer"):
        hf.build(128, base_width=32, density=1 / 32)
    line = [r.getMessage() for r in caplog.records if "weights per neuron" in r.getMessage()]
    assert len(line) == 1 and "transformer.h.*.mlp.c_fc 4 (fan-in 128" in line[0]
    assert "mlp.c_proj" not in line[0]  # fan-in 512 at 1/32: 16 weights


# -- sparse layouts on a user's model ---------------------------------------------------------


def test_compressed_and_masked_answer_the_same_questions_the_same_way():
    masked, msm = hf.build(64, base_width=32, density=0.25, sparse_impl="masked")
    comp, csm = hf.build(64, base_width=32, density=0.25, sparse_impl="compressed")
    assert set(csm.table().query("role == 'hidden'")["layout"]) == {"compressed"}
    for kind in HIDDEN:
        name = f"transformer.h.0.{kind}"
        a, b = masked.get_submodule(name), comp.get_submodule(name)
        assert type(b).__name__ == "CompressedLinear"
        assert b.weight.shape == a.weight.shape  # (in, out), as the Conv1D it replaced
        assert torch.equal(b.weight, a.weight) and torch.equal(b.weight_mask, a.weight_mask)
        assert torch.equal(b.mask, a.weight_mask)
    assert msm.n_params() == csm.n_params()
    assert msm.n_nonzero_params() == csm.n_nonzero_params() < msm.n_params()
    sd_m, sd_c = masked.state_dict(), comp.state_dict()
    assert {k: v.shape for k, v in sd_m.items()} == {k: v.shape for k, v in sd_c.items()}
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    opts = [torch.optim.AdamW(s.param_groups(1e-2, weight_decay=0.1)) for s in (msm, csm)]
    for model, opt in zip((masked, comp), opts, strict=True):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
    with torch.no_grad():  # the same update on the same non-zeros, up to float rounding
        torch.testing.assert_close(comp(x).logits, masked(x).logits, rtol=1e-4, atol=1e-5)
        # checkpoints load across layouts
        fresh, _ = hf.build(64, base_width=32, density=0.25, sparse_impl="masked", seed=3)
        fresh.load_state_dict(comp.state_dict())
        torch.testing.assert_close(fresh(x).logits, comp(x).logits, rtol=1e-5, atol=1e-6)


def test_auto_picks_compressed_where_it_was_measured_faster():
    model, sm = hf.build(512, base_width=64, density=1 / 64, sparse_impl="auto", n_layer=1)
    layouts = dict(zip(sm.table()["name"], sm.table()["layout"], strict=True))
    assert layouts["transformer.h.0.mlp.c_fc.weight"] == "compressed"  # 512 x 2048 at 1/64
    assert layouts["transformer.h.0.attn.c_proj.weight"] == "masked"  # 512 x 512: too small
    w = model.transformer.h[0].mlp.c_fc.weight  # readable whichever layout auto picked
    assert w.shape == (512, 2048) and int((w != 0).sum()) == 2048 * 8


def test_compressed_on_a_layer_it_cannot_hold_is_one_line():
    class ConvNet(nn.Module):
        def __init__(self, w: int) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, w)
            self.conv = nn.Conv1d(w, w, 3, padding=1)
            self.out = nn.Linear(w, 16)

        def forward(self, x):
            return self.out(self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2))

    with pytest.raises(ConfigError) as e:
        spartune.parameterize(ConvNet(64), base=ConvNet(32), density=0.5,
                              sparse_impl="compressed")
    assert e.value.field == "sparse_impl" and "conv is a Conv1d" in str(e.value)
    net = ConvNet(64)
    sm = spartune.parameterize(net, base=ConvNet(32), density=0.5)  # masked: per out channel
    assert (net.conv.weight_mask.flatten(1).sum(1) == round(0.5 * 64 * 3)).all()
    assert _rows(sm)["conv.weight"].width_mult == 2.0


# -- declared layouts and a Conv1D readout ----------------------------------------------------


class _InOut(nn.Module):
    """A layer that stores its weight (in, out) and is no known type: fan_in= must say so."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)

    def forward(self, x):
        return x @ self.w


class _Toy(nn.Module):
    def __init__(self, w: int, readout_conv1d: bool = False) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(16, w)
        self.mid = _InOut(w, 4 * w)
        self.out = Conv1D(16, 4 * w) if readout_conv1d else nn.Linear(4 * w, 16)

    def forward(self, x):
        return self.out(torch.relu(self.mid(self.emb(x))))


def test_fan_in_declared_for_an_unknown_layer():
    model = _Toy(64)
    sm = spartune.parameterize(model, base=_Toy(32), density=0.25, fan_in={"mid.w": 0})
    r = _rows(sm)["mid.w"]
    assert r.fan_in_dim == 0 and r.width_mult == 2.0
    assert (model.mid.w_mask.sum(0) == 16).all()  # 64 inputs at 1/4, per output
    for bad, field in [({"mid.w": 2}, "fan_in.mid.w"), ({"nothing.*": 0}, "fan_in.nothing.*"),
                       ({"mid.w": "in"}, "fan_in.mid.w")]:
        with pytest.raises(ConfigError) as e:
            spartune.parameterize(_Toy(64), base=_Toy(32), density=0.25, fan_in=bad)
        assert e.value.field == field and "\n" not in str(e.value)


def test_a_conv1d_readout_is_an_output_with_the_one_over_m_d_multiplier():
    model = _Toy(64, readout_conv1d=True)
    sm = spartune.parameterize(model, base=_Toy(32, readout_conv1d=True),
                               fan_in={"mid.w": 0})
    r = _rows(sm)["out.weight"]
    assert r.role == "output" and r.fan_in_dim == 0
    assert r.width_mult == 2.0 and r.forward_mult == 0.5
    x = torch.randint(0, 16, (2, 5))
    h = torch.relu(model.mid(model.emb(x)))
    assert torch.allclose(model(x), 0.5 * (h @ model.out.weight + model.out.bias), atol=1e-6)


# -- Llama, GQA, BERT -------------------------------------------------------------------------


def _llama(width: int, *, tied: bool, kv_heads: int | None = None) -> nn.Module:
    heads = width // 16
    c = transformers.LlamaConfig(
        vocab_size=64, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, head_dim=16,
        max_position_embeddings=32, tie_word_embeddings=tied, pad_token_id=None)
    return transformers.LlamaForCausalLM(c)


@pytest.mark.parametrize("tied", [True, False])
def test_llama_roles_masks_lr_and_attention(tied):
    model = _llama(64, tied=tied)
    sm = spartune.parameterize(model, base=_llama(32, tied=tied), density=0.25,
                               alpha_output=2.0)
    rows = _rows(sm)
    assert rows["model.embed_tokens.weight"].role == "embedding"
    head = rows["lm_head.weight"]
    assert head.role == "output" and head.forward_mult == 1.0
    assert head.tied_to == ("model.embed_tokens.weight" if tied else "")
    s = layer_scale("supar", "hidden", width_mult=2.0, density_mult=0.25)
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        r = rows[f"model.layers.1.{kind}.weight"]
        assert r.role == "hidden" and r.fan_in_dim == 1
        assert r.lr_mult == s.lr and r.init_std == pytest.approx(SIGMA * s.init)
        mod = model.get_submodule(f"model.layers.1.{kind}")
        assert (mod.weight_mask.sum(1) == round(0.25 * mod.in_features)).all()
    assert rows["model.norm.weight"].role == "norm"
    assert [layer.self_attn.scaling for layer in model.model.layers] == [1 / 16, 1 / 16]
    x = torch.randint(0, 64, (2, 8))
    assert torch.isfinite(model(x, labels=x).loss)


def test_llama_compressed_trains_as_masked():
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out = []
    for impl in ("masked", "compressed"):
        model = _llama(64, tied=False)
        sm = spartune.parameterize(model, base=_llama(32, tied=False), density=0.25,
                                   sparse_impl=impl)
        opt = torch.optim.AdamW(sm.param_groups(1e-2, weight_decay=0.1))
        model(x, labels=x).loss.backward()
        opt.step()
        proj = model.model.layers[0].self_attn.q_proj
        assert proj.weight.shape == (64, 64) and proj.weight_mask.sum(1).eq(16).all()
        out.append((model(x).logits, proj.weight.detach(), type(proj).__name__))
    assert [o[2] for o in out] == ["Linear", "CompressedLinear"]
    # the same update on the same non-zeros, up to float rounding (an update is ~lr = 1e-2)
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-5)


def test_gqa_fixed_kv_heads_are_readouts_said_in_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="spartune.parameterizer"):
        model = _llama(64, tied=False, kv_heads=1)
        sm = spartune.parameterize(model, base=_llama(32, tied=False, kv_heads=1), density=0.25)
    rows = _rows(sm)
    assert rows["model.layers.0.self_attn.k_proj.weight"].role == "output"
    assert rows["model.layers.0.self_attn.v_proj.weight"].role == "output"
    lines = [r.getMessage() for r in caplog.records if "fixed fan-out" in r.getMessage()]
    assert len(lines) == 1
    assert "4 weights" in lines[0] and "readout rule" in lines[0]
    assert "'model.layers.*.self_attn.k_proj.weight': 'hidden'" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spartune.parameterizer"):
        model = _llama(64, tied=False, kv_heads=1)
        sm = spartune.parameterize(model, base=_llama(32, tied=False, kv_heads=1), density=0.25,
                                   roles={"*.self_attn.[kv]_proj.weight": "hidden"})
    assert "fixed fan-out" not in caplog.text
    assert _rows(sm)["model.layers.0.self_attn.k_proj.weight"].role == "hidden"
    assert (model.model.layers[0].self_attn.k_proj.weight_mask.sum(1) == 16).all()


def _bert(width: int) -> nn.Module:
    c = transformers.BertConfig(vocab_size=64, hidden_size=width, num_hidden_layers=2,
                                num_attention_heads=width // 16, intermediate_size=2 * width,
                                max_position_embeddings=32, type_vocab_size=2,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(c)


def test_bert_encoder_roles_and_attention():
    model = _bert(64)
    sm = spartune.parameterize(model, base=_bert(32), density=0.5)
    rows = _rows(sm)
    for emb in ("word", "position", "token_type"):
        assert rows[f"bert.embeddings.{emb}_embeddings.weight"].role == "embedding"
    for kind in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"):
        r = rows[f"bert.encoder.layer.0.{kind}.weight"]
        assert r.role == "hidden" and r.width_mult == 2.0
    readout = [r for r in sm.rows if r.role == "output"]
    assert [r.tied_to for r in readout] == ["bert.embeddings.word_embeddings.weight"]
    assert readout[0].forward_mult == 0.5
    scales = [layer.attention.self.scaling for layer in model.bert.encoder.layer]
    assert scales == [1 / 16, 1 / 16]
    x = torch.randint(0, 64, (2, 8))
    assert torch.isfinite(model(x, labels=x).loss)


# -- checkpoints keep their masks -------------------------------------------------------------


def _train_a_little(model, sm, steps=3):
    opt = torch.optim.AdamW(sm.param_groups(1e-2, weight_decay=0.1))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 256, (4, 16), generator=gen)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


def test_hf_save_pretrained_from_pretrained_round_trip_same_logits(tmp_path):
    model, sm = hf.build(64, base_width=32, density=0.25, alpha_output=2.0)
    _train_a_little(model, sm)
    model.save_pretrained(tmp_path)
    x = torch.randint(0, 256, (2, 16))
    want = model(x).logits
    # from_pretrained drops the weight_mask buffers (not in GPT-2's definition); parameterize
    # with init=False takes each mask from the trained weight's zeros, whatever mask_seed says
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    base = hf.GPT2LMHeadModel(hf.config(32))
    sm2 = spartune.parameterize(loaded, base=base, density=0.25, alpha_output=2.0,
                                init=False, mask_seed=7)
    assert torch.equal(loaded(x).logits, want)
    for (_, a, _), (_, b, _) in zip(sm.hidden(), sm2.hidden(), strict=True):
        assert torch.equal(a.weight_mask, b.weight_mask)
    assert sm2.table()[["name", "lr_mult"]].equals(sm.table()[["name", "lr_mult"]])


def test_a_reload_whose_mask_would_zero_trained_weights_is_refused(tmp_path):
    model, sm = hf.build(64, base_width=32, density=0.25)
    _train_a_little(model, sm, steps=1)
    model.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    # every layer but one asks the density it was trained at: that one is refused, by name
    with pytest.raises(ConfigError) as e:
        spartune.parameterize(loaded, base=hf.GPT2LMHeadModel(hf.config(32)), init=False,
                              density={"transformer.h.1.attn.c_attn": 1 / 16, "*": 0.25})
    msg = str(e.value)
    assert e.value.field == "init" and "\n" not in msg
    assert msg.startswith("init: transformer.h.1.attn.c_attn: ") and "zeroing" in msg
    after = loaded.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing zeroed
    assert not any(k.endswith("_mask") for k in loaded.state_dict())  # nothing installed
    assert spartune.parameterization(loaded) is None


def test_load_state_dict_without_masks_into_a_masked_model_is_refused():
    model, sm = hf.build(64, base_width=32, density=0.25)
    _train_a_little(model, sm, steps=1)
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_mask")}
    fresh, _ = hf.build(64, base_width=32, density=0.25, seed=5)  # another mask
    before = fresh.transformer.h[0].attn.c_attn.weight.clone()
    with pytest.raises(RuntimeError, match=r"transformer\.h\.0\.attn\.c_attn\.weight: the "
                       "state dict has no weight_mask"):
        fresh.load_state_dict(weights, strict=False)
    assert torch.equal(fresh.transformer.h[0].attn.c_attn.weight, before)
    same, _ = hf.build(64, base_width=32, density=0.25, seed=0)  # the same masks: it fits
    same.load_state_dict(weights, strict=False)
    x = torch.randint(0, 256, (2, 8))
    assert torch.equal(same(x).logits, model(x).logits)


# -- the coordinate check on HF GPT-2 ---------------------------------------------------------


def test_coord_taps_and_default_loss_take_hf_outputs():
    from spartune.coord import _default_loss, _first_tensor

    t = torch.ones(2)
    out = transformers.modeling_outputs.CausalLMOutput(loss=None, logits=t)
    assert _first_tensor((None, (t, t))) is t and _first_tensor({"a": 1, "b": t}) is t
    assert _first_tensor(out) is t and _first_tensor((None,)) is None
    model, _ = hf.build(32, base_width=16, n_layer=1)
    x = torch.randint(0, 256, (2, 8))
    want = model(x, labels=x).loss
    assert torch.equal(_default_loss(model, (x, x)), want)  # not model(x, x): x is no cache
    assert torch.equal(_default_loss(model, {"input_ids": x, "labels": x}), want)


def test_coord_check_is_flat_under_supar_with_taps_on_hf_attention_modules():
    def make_model(*, width, density, param, seed):
        return hf.build(width, base_width=32, param=param, density=density, seed=seed,
                        n_positions=16)

    def data(gen):
        x = torch.randint(0, 256, (4, 16), generator=gen)
        return x, x  # HF shifts the labels itself

    taps = {"embedding": ["transformer.wte", "transformer.wpe"],
            "attn": ["transformer.h.*.attn"], "mlp": ["transformer.h.*.mlp"],
            "logits": ["lm_head"]}
    result = spartune.coord_check(make_model, [32, 64, 128], [1.0, 0.25], data=data, taps=taps,
                                  params=("supar",), seeds=[0], steps=3, lr=0.01)
    assert result.passed, str(result)
    attn = result.table.query("module == 'attn'")["l1"]
    assert len(attn) == 4 * 3 and attn.gt(0).all()  # cross grid: 4 cells, 3 steps


# -- examples/hf_gpt2 from its README: a sweep over HF GPT-2 that resumes, its transfer ----------

FAST = ["train.steps=6", "train.eval_every=3", "train.batch_size=4", "train.seq_len=32",
        "train.threads=1"]


@pytest.mark.slow
def test_hf_gpt2_example_sweep_resumes_and_transfers(tmp_path):
    import shutil

    import pandas as pd

    from conftest import cli

    example = tmp_path / "hf_gpt2"
    shutil.copytree(ROOT / "examples" / "hf_gpt2", example,
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    r = cli("spartune-sweep", "-cd", ".", "-cn", "hf_proxy", "study.n_trials=2", *FAST,
            cwd=example, timeout=600)
    assert r.returncode == 0, r.stderr
    first = pd.read_csv(example / "results" / "hf_proxy" / "trials.csv")
    r = cli("spartune-sweep", "-cd", ".", "-cn", "hf_proxy", "study.n_trials=3", *FAST,
            cwd=example, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "(1 run now" in r.stdout  # resumed: the two finished trials are not run again
    trials = pd.read_csv(example / "results" / "hf_proxy" / "trials.csv")
    assert list(trials["state"]) == ["COMPLETE"] * 3
    assert trials["lr"].iloc[:2].tolist() == first["lr"].tolist()
    r = cli("spartune-transfer", "-cd", ".", "-cn", "hf_transfer", *FAST,
            "transfer.widths=[128]", "transfer.densities=[1.0,0.0625]", cwd=example,
            timeout=600)
    assert r.returncode == 0, r.stderr
    targets = pd.read_csv(example / "results" / "hf_transfer" / "trials.csv")
    assert len(targets) == 4 and (targets["state"] == "COMPLETE").all()
    assert targets["final_val_loss"].notna().all()
    sparse = targets[targets["density"] < 1]
    assert (sparse["n_nonzero_params"] < sparse["n_params"]).all()


def test_hf_gpt2_layout_facts_script():
    import layout

    facts = layout.per_neuron(128, 1 / 32)
    assert facts == {"attn.c_attn": (128, 4, 4), "attn.c_proj": (128, 4, 4),
                     "mlp.c_fc": (128, 4, 4), "mlp.c_proj": (512, 16, 16)}
    assert layout.unequal_mlp_lr("mup") == {"c_fc": 0.25, "c_proj": 0.5}
