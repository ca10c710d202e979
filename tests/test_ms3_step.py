"""What the MS3 step does between the equations (MoCo order, Sec. 3.3): the EMA update of the
momentum encoder, the bank fed by that encoder, V lagging one step, the warm-up gate of Ỹ."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ms3_jax.method import labels, relations
from ms3_jax.stages import pretrain
from ms3_jax.testing.configs import tiny_pretrain_config as tiny_config
from ms3_jax.testing.pretrain_inputs import label_space, random_batch, random_text

MOMENTUM = 0.5  # far from 1, so the momentum and the online encoders differ after one step


def test_warmup_gate_of_the_multilabel_mapping():
    """Ỹ (Eq. 6) from the running S is off before `relations.warmup_steps`, exactly Eq. 6 after."""
    k = 4
    sim = jnp.asarray([[0.5, 0.7, 0.1, 0.0], [0.6, 0.5, 0.0, 0.0],
                       [0.0, 0.0, 0.9, 0.1], [0.0, 0.0, 0.2, 0.8]], jnp.float32)
    consts = {"other_dataset": relations.other_dataset_matrix(np.array([0, 1, 0, 1]))}
    seen = jnp.ones(k, bool)
    want = relations.multilabel_mask(sim, consts["other_dataset"], seen)
    assert bool(want[0, 1]) and int(want.sum()) == 2  # 0 -> 1 and 1 -> 0
    for step, on in ((0, False), (9, False), (10, True), (11, True)):
        state = types.SimpleNamespace(sim=sim, sim_seen=seen, step=jnp.asarray(step))
        np.testing.assert_array_equal(pretrain.positives(state, consts, warmup=10),
                                      np.asarray(want) & on)


@pytest.mark.slow
def test_step_ema_bank_from_the_momentum_encoder_and_v_lagging():
    config = tiny_config(**{"ema_momentum": MOMENTUM, "relations.warmup_steps": 100})
    ls = label_space()
    trainer = pretrain.Trainer(config, ls, random_text(config.model.emb_dim), num_steps=10)
    rng = np.random.default_rng(3)
    batches = [random_batch(rng), random_batch(rng)]
    state = trainer.init_state(jax.random.PRNGKey(0))
    s0 = jax.device_get(state)
    state, m1 = trainer.step(state, trainer.global_batch(batches[0]))
    s1 = jax.device_get(state)
    state, m2 = trainer.step(state, trainer.global_batch(batches[1]))
    s2 = jax.device_get(state)

    # V lags one step: the first step's visual loss has no V yet (the bank is empty at its
    # start), so it is 0; V made from the first step's bank enters the second step's loss.
    assert not s0.visual_valid.any() and s1.visual_valid.any()
    assert m1["loss_visual"] == 0.0 and m1["loss_language"] > 0.0 and m2["loss_visual"] > 0.0

    # EMA (MoCo): theta_hat <- m theta_hat + (1 - m) theta, with the updated online theta.
    for old, new, online in zip(jax.tree_util.tree_leaves(s1.ema_params),
                                jax.tree_util.tree_leaves(s2.ema_params),
                                jax.tree_util.tree_leaves(s2.params)):
        ref = MOMENTUM * np.asarray(old, np.float64) + (1 - MOMENTUM) * np.asarray(online, np.float64)
        np.testing.assert_allclose(new, ref, rtol=1e-6, atol=1e-7)

    # The rows step 2 wrote into the bank are keys of the updated momentum encoder
    # (batch-statistics BN) at pixels of their class, not the online encoder's embeddings.
    images = jnp.asarray(batches[1]["image"])
    apply = lambda model, params, stats: np.asarray(model.apply(
        {"params": params, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
    )[0]["visual"])
    keys = apply(trainer.model.clone(heads=("visual",)), s2.ema_params, s2.ema_batch_stats)
    online = apply(trainer.model, s2.params, s2.batch_stats)
    y = np.asarray(labels.downsample_labels(jnp.asarray(batches[1]["label"]), keys.shape[1:3])).reshape(-1)
    keys, online = keys.reshape(-1, keys.shape[-1]), online.reshape(-1, keys.shape[-1])
    written = 0
    for c in range(ls.num_classes):
        old_rows = np.asarray(s1.bank.feats[c], np.float32)
        rows = np.asarray(s2.bank.feats[c, :s2.bank.count[c]], np.float32)
        rows = rows[np.abs(rows - old_rows[:len(rows)]).max(-1) > 0]  # written by step 2
        if not len(rows):
            continue
        written += len(rows)
        nearest = lambda emb: np.abs(rows[:, None] - emb[y == c][None]).max(-1).min(1)
        # (keys recomputed here on one device: float32 reassociation of the 8-device step)
        assert nearest(keys).max() < 1e-4, c
        assert nearest(online).min() > 10 * nearest(keys).max(), (c, nearest(online).min())
    assert written > 0


def _loops_in_step(config, data_shards):
    """The number of `scan`s in the jaxpr of the MS3 step built for `data_shards` devices."""
    from ms3_jax.engine import optim
    from ms3_jax.method.train_state import init_train_state
    ls = label_space()
    k, c = ls.num_classes, config.model.emb_dim
    model = pretrain.build_model(config, k, "cpu")
    tx = optim.make_optimizer(config, 10)
    step = pretrain.make_train_step(config, model, tx, optim.lr_schedule(config, 10), data_shards)
    size = config.data.crop_size

    def init(rng):
        variables = model.init(rng, jnp.zeros((1, size, size, 3), jnp.uint8))
        return init_train_state(variables, tx, k, c, config.bank.slots,
                                jnp.dtype(config.bank.dtype), rng)

    state = jax.eval_shape(init, jax.random.PRNGKey(0))
    batch = jax.tree_util.tree_map(jnp.asarray, random_batch(np.random.default_rng(0), 8, size))
    consts = {"text": jnp.asarray(random_text(c)),
              "other_dataset": relations.other_dataset_matrix(ls.dataset_of_class),
              "dataset_of_class": jnp.asarray(ls.dataset_of_class),
              "name_id": jnp.asarray(labels.distinct_names(ls.names)[1])}
    return str(jax.make_jaxpr(step)(state, batch, consts)).count(" scan[")


def test_loss_chunk_counts_the_pixels_of_one_device():
    """`loss.chunk` is per device: 8 images of 32 px on 8 devices are 16 embedding pixels per
    device, so chunk=16 runs the pairing losses and S (Eq. 5) in one chunk on 8 devices (no
    loop, as with no chunking at all), in 8 chunks on one."""
    one_chunk = _loops_in_step(tiny_config(**{"loss.chunk": None}), 1)
    assert _loops_in_step(tiny_config(**{"loss.chunk": 16}), 8) == one_chunk
    assert _loops_in_step(tiny_config(**{"loss.chunk": 16}), 1) > one_chunk
