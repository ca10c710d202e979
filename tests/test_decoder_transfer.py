"""What an MS3 pretraining trains: with `model.heads_at='aspp'` (the projection heads after the
ASPP, paper 4.1) the MS3 loss never reaches the DeepLab-v3+ decoder, so fine-tuning
(`init.what='segmentor'`) and export (`--what segmentor`) must not hand it over as pretrained
(`deeplab.untrained_subtrees`; the transfers themselves: tests/test_finetune.py,
tests/test_export_cli.py)."""
import jax
import jax.numpy as jnp
import pytest

from ms3_jax.method import losses
from ms3_jax.models.deeplab import DECODER_MODULES, encoder_from_config, l2_normalize, untrained_subtrees
from ms3_jax.testing.variables import random_variables

TINY = dict(width=0.125, stage_sizes=(1, 1, 1, 1), emb_dim=8, kernels="xla")


def _grad_norms(heads_at):
    """Per-module L1 norms of the gradient (backbone; each module of decode_head) of the MS3
    pairing losses (Eq. 1 + 2: language vs T, visual vs V; train mode, as in pretraining)."""
    model = encoder_from_config(dict(TINY, heads_at=heads_at), "cpu")
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    images = jax.random.randint(k[0], (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
    variables = random_variables(model, images.shape, seed=0, scale=0.2)
    num_classes = 5
    text = l2_normalize(jax.random.normal(k[1], (num_classes, 8)))
    visual = l2_normalize(jax.random.normal(k[2], (num_classes, 8)))

    def loss_fn(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                             train=True, mutable=["batch_stats"])
        labels = jax.random.randint(k[3], out["language"].shape[:3], 0, num_classes)
        return (losses.pairing_loss(out["language"], text, labels)
                + losses.pairing_loss(out["visual"], visual, labels))

    grads = jax.jit(jax.grad(loss_fn))(variables["params"])
    norm = lambda t: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(t)))
    return {"backbone": norm(grads["backbone"]),
            **{m: norm(g) for m, g in grads["decode_head"].items()}}


@pytest.mark.parametrize("heads_at", ["aspp", "decoder"])
def test_ms3_loss_trains_the_decoder_only_with_heads_at_decoder(heads_at):
    """heads_at='aspp': exactly zero gradient for every decoder parameter, nonzero for the
    backbone and every ASPP module; heads_at='decoder': the decoder gets a gradient too."""
    norms = _grad_norms(heads_at)
    assert set(DECODER_MODULES) < set(norms)  # the names `untrained_subtrees` returns exist
    aspp = set(norms) - set(DECODER_MODULES) - {"backbone"}
    assert aspp == {"image_pool_1", "bottleneck", *(f"aspp_modules_{i}" for i in range(4))}
    assert all(norms[m] > 0 for m in ("backbone", *aspp)), norms
    decoder = {m: norms[m] for m in DECODER_MODULES}
    if heads_at == "aspp":
        assert all(v == 0.0 for v in decoder.values()), decoder
    else:
        assert all(v > 0 for v in decoder.values()), decoder


def test_untrained_subtrees_follow_the_workdir_config():
    decoder = tuple(("decode_head", m) for m in DECODER_MODULES)
    aspp = {"mode": "pretrain", "model": {"heads_at": "aspp"}, "loss": {"kind": "ms3"}}
    assert untrained_subtrees(aspp) == decoder
    assert untrained_subtrees({"model": {"heads_at": "aspp"}}) == decoder  # loss.kind default: ms3
    assert untrained_subtrees({**aspp, "model": {"heads_at": "decoder"}}) == ()
    assert untrained_subtrees({"mode": "pretrain", "model": {}}) == ()  # built with the default
    for kind in ("ce_single_head", "ce_multi_head"):  # the classifier trains the decoder
        assert untrained_subtrees({**aspp, "loss": {"kind": kind}}) == ()
    assert untrained_subtrees({**aspp, "mode": "finetune"}) == ()
