"""Tests of ``train.optim``: the official AdamW groups, the per-step schedules and the stage-2 freezing, on
``lfvila-tiny`` (BERT layers 2 / 4 / 6: stage-1 layers 0..3, fusion layers 4, 5)."""

import pytest
import torch
import torch.nn as nn

from lfvila.models import create_model
from train.optim import (
    ALL_NORMS_NO_DECAY,
    STAGE2_EXCLUDE,
    STAGE2_FROZEN,
    STAGE2_OFFICIAL_EVAL,
    apply_frozen_eval,
    build_optimizer,
    build_scheduler,
    freeze,
    param_groups,
    stage2_frozen_patterns,
)

LR = 1e-3
BERT_LAYER = [f"attention.self.{m}.{k}" for m in ("query", "key", "value") for k in ("weight", "bias")] + [
    "attention.output.dense.weight", "attention.output.dense.bias",
    "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
    "intermediate.dense.weight", "intermediate.dense.bias",
    "output.dense.weight", "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias",
]
PROJ = [f"{s}_{k}_proj.{p}" for k in ("local", "global") for s in ("video", "text") for p in ("weight", "bias")]


def _model(stage=2):
    torch.manual_seed(0)
    return create_model("lfvila-tiny", stage=stage)


def _names(groups):
    return [n for g in groups for n in g["names"]]


def _by_decay(groups):
    return {g["weight_decay"]: set(g["names"]) for g in groups}


# ------------------------------------------------------------------------------------------------ grouping


def test_groups_partition_every_trainable_param_once():
    model = _model()
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # official order: decayed group first
    names = _names(groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(names) == len(set(names)) and len(ids) == len(set(ids))
    assert names == [n for g in groups for n in g["names"]]
    assert set(names) == {n for n, _ in model.named_parameters()}  # stage 2 model, nothing frozen: all of them
    for g in groups:
        assert len(g["params"]) == len(g["names"])
        named = dict(model.named_parameters())
        assert all(named[n] is p for n, p in zip(g["names"], g["params"]))


def test_tied_mlm_decoder_counted_once():
    model = _model()
    aliases = dict(model.named_parameters(remove_duplicate=False))
    dec_w, dec_b = "text_encoder.cls.predictions.decoder.weight", "text_encoder.cls.predictions.decoder.bias"
    # official: the decoder weight is its own parameter (untied), the decoder bias is cls.predictions.bias
    assert aliases[dec_w] is not aliases["text_encoder.bert.embeddings.word_embeddings.weight"]
    assert aliases[dec_b] is aliases["text_encoder.cls.predictions.bias"]
    groups = param_groups(model, 0.05)
    names = _names(groups)
    assert dec_w in names and dec_b not in names
    assert names.count("text_encoder.bert.embeddings.word_embeddings.weight") == 1
    assert names.count("text_encoder.cls.predictions.bias") == 1
    ids = [id(p) for g in groups for p in g["params"]]
    assert ids.count(id(aliases[dec_w])) == 1 and ids.count(id(aliases[dec_b])) == 1


def test_official_no_decay_names():
    groups = _by_decay(param_groups(_model(), 0.05))
    decay, zero = groups[0.05], groups[0.0]
    for name in ("video_encoder.layers.0.blocks.0.attn.relative_position_bias_table",
                 "video_encoder.layers.5.blocks.0.attn.relative_position_bias_table",
                 "video_encoder.layers.0.blocks.0.attn.qkv.bias", "video_encoder.norm.bias",
                 "video_encoder.layers.0.blocks.0.norm1.bias", "video_encoder.patch_embed.proj.bias",
                 "text_encoder.bert.embeddings.LayerNorm.weight", "text_encoder.bert.embeddings.LayerNorm.bias",
                 "text_encoder.bert.encoder.layer.0.attention.output.LayerNorm.weight",
                 "text_encoder.bert.encoder.layer.5.output.LayerNorm.weight",
                 "text_encoder.cls.predictions.transform.LayerNorm.weight", "text_encoder.cls.predictions.bias",
                 "video_token_pos.s_pos_embed", "video_token_pos.t_pos_embed", "sent_embedding.norm.bias",
                 "video_local_proj.bias"):
        assert name in zero, name
    # The official rules are name-based: the norms not called "LayerNorm" keep weight decay on their weight, and
    # BERT's position embeddings do not match "pos_embed".
    for name in ("video_encoder.patch_embed.norm.weight", "video_encoder.layers.0.blocks.0.norm1.weight",
                 "video_encoder.layers.0.blocks.0.norm2.weight", "video_encoder.layers.0.downsample.norm.weight",
                 "video_encoder.norm.weight", "video_encoder.norm_local.weight",
                 "video_encoder.local_feat_proj.norm.weight", "sent_embedding.norm.weight",
                 "video_token_pos.norm.weight", "text_encoder.bert.embeddings.position_embeddings.weight",
                 "text_encoder.bert.embeddings.word_embeddings.weight", "sent_embedding.position_embeddings.weight",
                 "video_encoder.layers.0.blocks.0.attn.qkv.weight",
                 "video_encoder.layers.0.downsample.reduction.weight",
                 "text_encoder.bert.encoder.layer.0.attention.self.query.weight", "video_global_proj.weight"):
        assert name in decay, name
    # exactly: biases, BERT LayerNorm weights, the two position tables and the relative-position bias tables
    expected = {n for n in decay | zero if n.endswith(".bias") or n.endswith("LayerNorm.weight")
                or n.endswith("relative_position_bias_table") or n.endswith("_pos_embed")}
    assert zero == expected
    # no 1-D rule: the 1-D parameters that are decayed are exactly the non-BERT norm weights
    shapes = {n: p.ndim for n, p in _model().named_parameters()}
    one_d_decayed = {n for n in decay if shapes[n] == 1}
    assert one_d_decayed and all(n.endswith("norm.weight") or n.endswith(("norm1.weight", "norm2.weight",
                                                                          "norm_local.weight"))
                                 for n in one_d_decayed)


def test_all_norms_rule_is_the_1d_rule_on_our_model():
    model = _model()
    zero = _by_decay(param_groups(model, 0.05, no_decay=ALL_NORMS_NO_DECAY))[0.0]
    expected = {n for n, p in model.named_parameters()
                if p.ndim == 1 or n.endswith(("relative_position_bias_table", "_pos_embed"))}
    assert zero == expected


def test_pooler_excluded_and_frozen_left_out():
    model = _model()
    freeze(model, stage2_frozen_patterns(model.cfg.text.stage1_layers))
    names = set(_names(param_groups(model, 0.05, exclude=STAGE2_EXCLUDE)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    pooler = {"text_encoder.bert.pooler.dense.weight", "text_encoder.bert.pooler.dense.bias"}
    assert pooler <= trainable  # the pooler is not frozen, only left out of the optimizer (official)
    assert names == trainable - pooler
    # without exclude it is grouped like any parameter
    assert pooler <= set(_names(param_groups(model, 0.05)))


def test_param_groups_unwraps_wrappers():
    model = _model(stage=1)
    plain = param_groups(model, 0.05)
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        groups = param_groups(wrapped, 0.05, exclude=(r"^text_encoder\.bert\.pooler\.",))
        assert _names(groups) == [n for n in _names(plain) if ".pooler." not in n]


# ----------------------------------------------------------------------------------------------- optimizer


def test_build_optimizer_cpu_not_fused_and_groups():
    model = _model()
    opt = build_optimizer(model, 5e-5, 0.05, exclude=STAGE2_EXCLUDE)
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups) == 2
    for g in opt.param_groups:
        assert not g["fused"] and g["foreach"] is True
        assert g["lr"] == 5e-5 and g["betas"] == (0.9, 0.98) and g["eps"] == 1e-8
        assert len(g["names"]) == len(g["params"])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert not any("pooler" in n for g in opt.param_groups for n in g["names"])


@pytest.mark.gpu
def test_build_optimizer_fused_on_cuda():
    model = _model().cuda()
    opt = build_optimizer(model, 5e-5, 0.05)
    assert all(g["fused"] is True and not g["foreach"] for g in opt.param_groups)
    assert all(not g["fused"] for g in build_optimizer(model, 5e-5, 0.05, fused=False).param_groups)


def test_weight_decay_applied_only_to_decay_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[1].weight.data.uniform_(0.5, 1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, 0.1, 0.5, no_decay=ALL_NORMS_NO_DECAY + (r"^1\.weight$",))
    assert _by_decay(opt.param_groups) == {0.5: {"0.weight"}, 0.0: {"0.bias", "1.weight", "1.bias"}}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: the Adam step is 0, only the decoupled decay acts
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["0.weight"], before["0.weight"] * (1 - 0.1 * 0.5))
    for n in ("0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(after[n], before[n])


# ----------------------------------------------------------------------------------------------- schedules


def _lrs(schedule, steps, *, lr=LR, **kw):
    """The lr each optimizer step uses, for steps 0 .. steps-1 (scheduler stepped after every optimizer step)."""
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = build_scheduler(opt, schedule=schedule, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out.append(opt.param_groups[0]["lr"])
    return out


def _check(lrs, expected):
    for s, v in expected.items():
        assert lrs[s] == pytest.approx(v, rel=1e-9, abs=1e-15), f"step {s}: {lrs[s]} != {v}"


def test_linear_schedule():
    lrs = _lrs("linear", 150, total_steps=100, warmup_steps=10)
    # warmup from 0 (official WARMUP_LR 0); then 1 - 0.99 (s - 10) / 90; 1 % of lr at total_steps, held after
    _check(lrs, {0: 0.0, 5: 5e-4, 9: 9e-4, 10: 1e-3, 55: 5.05e-4, 99: 2.1e-5, 100: 1e-5, 150: 1e-5})
    # the loop always passes min_lr (config default 1e-8): linear ignores it and still ends at 1 %
    _check(_lrs("linear", 100, total_steps=100, warmup_steps=10, min_lr=1e-8), {100: 1e-5})
    _check(_lrs("linear", 20, total_steps=20, warmup_steps=0, min_lr_ratio=0.0), {0: 1e-3, 10: 5e-4, 20: 0.0})
    # warmup == total (the loop clamps warmup to the run length): warmup, then the floor
    _check(_lrs("linear", 10, total_steps=10, warmup_steps=10), {9: 9e-4, 10: 1e-5})


def test_cosine_schedule():
    m = 1e-8
    lrs = _lrs("cosine", 120, total_steps=100, warmup_steps=10, min_lr=m)
    # timm (warmup_prefix=False): cos(pi s / T) measured from step 0, so step 10 is cos(0.1 pi), not the full lr
    _check(lrs, {0: 0.0, 5: 5e-4, 9: 9e-4,
                 10: m + (LR - m) * (1 + 0.95105651629515357) / 2,
                 50: (LR + m) / 2,
                 99: m + (LR - m) * (1 - 0.99950656036573160) / 2,
                 100: m, 120: m})
    # min_lr None: the floor is min_lr_ratio * lr
    _check(_lrs("cosine", 100, total_steps=100, warmup_steps=0, min_lr_ratio=0.1), {0: LR, 50: 5.5e-4, 100: 1e-4})
    # warmup_prefix (not official): the cosine starts at the end of warmup
    _check(_lrs("cosine", 100, total_steps=100, warmup_steps=10, min_lr=0.0, warmup_prefix=True),
           {10: LR, 55: LR / 2, 100: 0.0})


def test_step_schedule():
    lrs = _lrs("step", 100, total_steps=100, warmup_steps=10, step_size=20, gamma=0.25)
    _check(lrs, {0: 0.0, 9: 9e-4, 10: LR, 19: LR, 20: LR / 4, 39: LR / 4, 40: LR / 16, 99: LR / 256})
    # ActivityNet retrieval: 20 epochs, 1 warmup, x0.25 every 5 epochs (timm counts from step 0: epochs 5, 10, 15)
    e = 3
    lrs = _lrs("step", 20 * e, total_steps=20 * e, warmup_steps=e, step_size=5 * e, gamma=0.25)
    _check(lrs, {0: 0.0, 2: LR * 2 / 3, 3: LR, 14: LR, 15: LR / 4, 29: LR / 4, 30: LR / 16, 45: LR / 64, 59: LR / 64})
    # Condensed Movies: x0.5 every epoch, one warmup epoch: the step right after warmup already runs at lr / 2
    e = 4
    _check(_lrs("step", 20 * e, total_steps=20 * e, warmup_steps=e, step_size=e, gamma=0.5),
           {3: LR * 3 / 4, 4: LR / 2, 7: LR / 2, 8: LR / 4})
    _check(_lrs("step", 40, total_steps=40, warmup_steps=10, step_size=20, gamma=0.25, warmup_prefix=True),
           {10: LR, 29: LR, 30: LR / 4})


def test_constant_schedule_and_all_groups():
    _check(_lrs("constant", 100, total_steps=100, warmup_steps=10), {0: 0.0, 5: 5e-4, 10: LR, 100: LR})
    model = _model(stage=1)
    opt = build_optimizer(model, LR, 0.05)
    sched = build_scheduler(opt, schedule="cosine", total_steps=10, warmup_steps=2, min_lr=1e-8)
    assert len(opt.param_groups) == 2
    for _ in range(10):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-8, 1e-8], rel=1e-9)


def test_scheduler_state_dict_resumes():
    def make():
        p = nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([p], lr=LR)
        return opt, build_scheduler(opt, schedule="linear", total_steps=50, warmup_steps=5)

    opt, sched = make()
    for _ in range(17):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(5):
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()


@pytest.mark.parametrize("kw, arg", [
    (dict(schedule="poly"), "schedule"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10.0), "total_steps"),
    (dict(total_steps=True), "total_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=11), "warmup_steps"),
    (dict(warmup_steps=1.5), "warmup_steps"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(schedule="cosine", min_lr=-1.0), "min_lr"),
    (dict(schedule="cosine", min_lr=1.0), "min_lr"),
    (dict(schedule="step", gamma=0.5), "step_size"),
    (dict(schedule="step", step_size=0, gamma=0.5), "step_size"),
    (dict(schedule="step", step_size=2), "gamma"),
    (dict(schedule="step", step_size=2, gamma=0.0), "gamma"),
    (dict(warmup_prefix=1), "warmup_prefix"),
])
def test_scheduler_argument_errors(kw, arg):
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=LR)
    args = dict(schedule="linear", total_steps=10, warmup_steps=1) | kw
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        build_scheduler(opt, **args)


@pytest.mark.parametrize("call, arg", [
    (lambda m: build_optimizer(m, 0.0, 0.05), "lr"),
    (lambda m: build_optimizer(m, 1e-3, -0.1), "weight_decay"),
    (lambda m: build_optimizer(m, 1e-3, 0.05, (0.9,)), "betas"),
    (lambda m: build_optimizer(m, 1e-3, 0.05, (0.9, 1.0)), "betas"),
    (lambda m: build_optimizer(m, 1e-3, 0.05, eps=-1.0), "eps"),
    (lambda m: build_optimizer(m, 1e-3, 0.05, fused="yes"), "fused"),
    (lambda m: param_groups(m, 0.05, exclude="pooler"), "exclude"),
    (lambda m: param_groups(m, 0.05, no_decay=("(",)), "no_decay"),
    (lambda m: freeze(m, (r"^no_such_module\.",)), "patterns"),
    (lambda m: freeze(m, (r"[",)), "patterns"),
    (lambda m: stage2_frozen_patterns(0), "stage1_layers"),
])
def test_optimizer_and_freeze_argument_errors(call, arg):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        call(model)


def test_no_trainable_parameter_is_an_error():
    model = nn.Linear(2, 2)
    freeze(model, (r".",))
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_optimizer(model, 1e-3, 0.05)


# ------------------------------------------------------------------------------------------------- freezing


def test_stage2_patterns_freeze_exactly_the_stage1_parts():
    model = _model()
    assert model.cfg.text.stage1_layers == 4 and model.cfg.text.num_layers == 6
    all_names = [n for n, _ in model.named_parameters()]
    frozen = freeze(model, stage2_frozen_patterns(model.cfg.text.stage1_layers))
    video = [n for n in all_names if n.startswith("video_encoder.")]
    expected_frozen = set(video) | {
        "text_encoder.bert.embeddings.word_embeddings.weight",
        "text_encoder.bert.embeddings.position_embeddings.weight",
        "text_encoder.bert.embeddings.token_type_embeddings.weight",
        "text_encoder.bert.embeddings.LayerNorm.weight",
        "text_encoder.bert.embeddings.LayerNorm.bias",
        *(f"text_encoder.bert.encoder.layer.{i}.{s}" for i in range(4) for s in BERT_LAYER),
        *PROJ,
        "sent_embedding.position_embeddings.weight", "sent_embedding.segment_embeddings.weight",
        "sent_embedding.norm.weight", "sent_embedding.norm.bias",
    }
    expected_trainable = {
        *(f"text_encoder.bert.encoder.layer.{i}.{s}" for i in (4, 5) for s in BERT_LAYER),
        "text_encoder.bert.pooler.dense.weight", "text_encoder.bert.pooler.dense.bias",
        "text_encoder.cls.predictions.bias", "text_encoder.cls.predictions.decoder.weight",
        "text_encoder.cls.predictions.transform.dense.weight", "text_encoder.cls.predictions.transform.dense.bias",
        "text_encoder.cls.predictions.transform.LayerNorm.weight",
        "text_encoder.cls.predictions.transform.LayerNorm.bias",
        "text_encoder.seq_relationship.weight", "text_encoder.seq_relationship.bias",
        "video_token_pos.s_pos_embed", "video_token_pos.t_pos_embed",
        "video_token_pos.norm.weight", "video_token_pos.norm.bias",
    }
    assert len(video) > 100
    assert set(frozen) == expected_frozen and len(frozen) == len(expected_frozen)
    assert frozen == [n for n in all_names if n in expected_frozen]  # named_parameters() order
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_trainable
    assert expected_frozen | expected_trainable == set(all_names)
    # the MLM decoder is untied from the word embeddings (official), so it stays trainable while they are frozen
    aliases = dict(model.named_parameters(remove_duplicate=False))
    assert aliases["text_encoder.cls.predictions.decoder.weight"].requires_grad
    assert aliases["text_encoder.cls.predictions.decoder.bias"].requires_grad
    # the optimizer then holds the trainable parameters except the pooler
    opt = build_optimizer(model, 5e-5, 0.05, exclude=STAGE2_EXCLUDE)
    assert set(_names(opt.param_groups)) == expected_trainable - {"text_encoder.bert.pooler.dense.weight",
                                                                  "text_encoder.bert.pooler.dense.bias"}


def test_stage2_frozen_layer_pattern():
    layer = STAGE2_FROZEN[-1]
    import re

    assert STAGE2_FROZEN == stage2_frozen_patterns(12)
    for i in range(12):
        assert re.search(layer, f"text_encoder.bert.encoder.layer.{i}.output.dense.weight")
    for i in range(12, 24):
        assert not re.search(layer, f"text_encoder.bert.encoder.layer.{i}.output.dense.weight")
    assert not re.search(layer, "x.text_encoder.bert.encoder.layer.1.output.dense.weight")


def test_freeze_tied_alias_and_strict():
    model = _model()
    # the pattern names only the alias; the shared Parameter is frozen and reported under its first name
    assert freeze(model, (r"cls\.predictions\.decoder\.bias$",)) == ["text_encoder.cls.predictions.bias"]
    assert not model.text_encoder.cls.predictions.bias.requires_grad
    assert freeze(model, (r"^nothing\.",), strict=False) == []
    assert freeze(model, ()) == []


def _training(model, prefix):
    return {m.training for n, m in model.named_modules() if n == prefix or n.startswith(prefix + ".")}


FROZEN_MODULES = ["video_encoder", "text_encoder.bert.embeddings",
                  *(f"text_encoder.bert.encoder.layer.{i}" for i in range(4)), *(p.split(".")[0] for p in PROJ[::2]),
                  "sent_embedding"]


def test_apply_frozen_eval_survives_train():
    model = _model()
    patterns = stage2_frozen_patterns(4)
    freeze(model, patterns)
    model.train()
    assert _training(model, "video_encoder") == {True}  # model.train() undoes any earlier eval()
    done = apply_frozen_eval(model, patterns)
    assert done == FROZEN_MODULES
    for prefix in FROZEN_MODULES:
        assert _training(model, prefix) == {False}, prefix
    for prefix in ("text_encoder.bert.encoder.layer.4", "text_encoder.bert.encoder.layer.5", "text_encoder.cls",
                   "text_encoder.bert.pooler", "video_token_pos"):
        assert _training(model, prefix) == {True}, prefix
    assert model.training and model.text_encoder.training
    # every epoch: train() then apply_frozen_eval() again
    model.train()
    assert apply_frozen_eval(model, patterns) == FROZEN_MODULES
    # patterns=None finds the same wholly frozen modules; an empty list does nothing; wrappers are unwrapped
    model.train()
    assert apply_frozen_eval(model) == FROZEN_MODULES
    model.train()
    assert apply_frozen_eval(model, []) == [] and _training(model, "video_encoder") == {True}
    assert apply_frozen_eval(nn.DataParallel(model), patterns) == FROZEN_MODULES


def test_frozen_eval_turns_dropout_off():
    model = _model()
    patterns = stage2_frozen_patterns(4)
    freeze(model, patterns)
    model.train()
    apply_frozen_eval(model, patterns)
    emb = model.sent_embedding
    x = torch.randn(2, 8, 256)
    torch.testing.assert_close(emb(x, 4), emb(x, 4))  # dropout p = 0.1 is off in the frozen module
    model.train()
    assert not torch.equal(emb(x, 4), emb(x, 4))  # ... and on after a bare model.train()


def test_official_eval_only_keeps_the_video_encoder():
    model = _model()
    freeze(model, stage2_frozen_patterns(4))
    model.train()
    assert apply_frozen_eval(model, STAGE2_OFFICIAL_EVAL) == ["video_encoder"]
    assert _training(model, "text_encoder.bert.encoder.layer.0") == {True}
    assert _training(model, "sent_embedding") == {True}


def test_apply_frozen_eval_skips_partly_trainable_modules():
    model = _model()
    freeze(model, (r"^video_encoder\.layers\.0\.",))
    model.train()
    assert apply_frozen_eval(model, (r"^video_encoder\.",)) == ["video_encoder.layers.0"]
    assert model.video_encoder.training and not model.video_encoder.layers[0].training
    assert model.video_encoder.pos_drop.training and model.video_encoder.layers[1].blocks[0].drop_path.training
