"""Union label space, synthetic multi-dataset and grain pipeline (paper Sec. 3.1, 4.1)."""

import glob
import json
import os

from absl import flags
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from ms3_jax.data import augment, eval_data, pipeline, synthetic
from ms3_jax.data.label_space import IGNORE_INDEX, UNION_IGNORE, LabelSpace
from ms3_jax.evaluation import evaluate
from ms3_jax.testing import synthetic_data

SMALL = dict(crop_size=32, base_size=32)


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    return synthetic_data.build(tmp_path_factory.getbasetemp(), num_train=30, num_val=4)


def _pipe(synth, **kw):
    kw.setdefault('augment', augment.AugmentConfig(**SMALL))
    kw.setdefault('global_batch_size', 6)
    kw.setdefault('shard_index', 0)
    kw.setdefault('shard_count', 1)
    return pipeline.TrainPipeline(synth.dataset_names, data_dir=synth.data_dir, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- label space ----------------------------------------------------------------------------------

def test_label_space_real_datasets():
    ls = LabelSpace.from_datasets(['voc', 'ade20k', 'coco_stuff'])
    assert ls.num_classes == len(ls) == 21 + 150 + 171 == 342
    np.testing.assert_array_equal(ls.offsets, [0, 21, 171, 342])
    assert len(ls.names) == len(ls.display_names) == ls.dataset_of_class.shape[0] == 342
    assert ls.names[21] == 'wall' and ls.display_names[21] == 'ade20k/wall'
    assert ls.union_id('ade20k/stairway') == 21 + ls.class_names[1].index('stairway')
    assert ls.display_names[ls.union_id('voc/person')] == 'voc/person'
    # No merging across datasets: 'person' appears three times.
    assert ls.names.count('person') == 3 and ls.names.count('boat') == 3
    np.testing.assert_array_equal(np.bincount(ls.dataset_of_class), [21, 150, 171])


def test_label_space_to_union_and_masks():
    ls = LabelSpace({'a': ['x', 'y'], 'b': ['y', 'z', 'w'], 'c': ['q']})
    assert ls.num_classes == 6 and ls.display_names[2] == 'b/y'
    np.testing.assert_array_equal(ls.dataset_of_class, [0, 0, 1, 1, 1, 2])
    local = np.array([[0, 1], [2, 255]], np.uint8)
    np.testing.assert_array_equal(ls.to_union(local, 'b'), [[2, 3], [4, UNION_IGNORE]])
    np.testing.assert_array_equal(ls.to_union(local[:1], 0), [[0, 1]])
    assert ls.to_union(local, 1).dtype == np.int32
    # Vectorised over a batch with one dataset id per example.
    batch = np.stack([np.array([[0, 255]]), np.array([[2, 1]]), np.array([[0, 0]])])
    np.testing.assert_array_equal(ls.to_union(batch, np.array([0, 1, 2])),
                                  [[[0, -1]], [[4, 3]], [[5, 5]]])
    loc, ds = ls.to_local(np.array([0, 4, UNION_IGNORE, 5]))
    np.testing.assert_array_equal(loc, [0, 2, 255, 0])
    np.testing.assert_array_equal(ds, [0, 1, -1, 2])
    with pytest.raises(ValueError, match='out of range'):
        ls.to_union(np.array([1]), 'c')
    m = ls.other_dataset_mask()
    assert m.shape == (6, 6) and m.dtype == bool
    assert not m[0, 1] and m[0, 2] and m[2, 0] and not m[2, 4] and m[4, 5] and not m.diagonal().any()
    lut = ls.to_union_lut('b')
    assert lut.shape == (256,) and lut[0] == 2 and lut[2] == 4 and lut[3] == UNION_IGNORE and lut[255] == UNION_IGNORE
    rel = ls.relation_matrix([{'from': 'a/y', 'to': 'b/y'}, {'from': 'nope/x', 'to': 'a/x'}])
    assert rel.sum() == 1 and rel[1, 2]


def test_label_space_errors():
    with pytest.raises(ValueError, match=r"Unknown dataset.*valid names.*ade20k"):
        LabelSpace.from_datasets(['voc', 'imagenet'])
    with pytest.raises(ValueError, match='Duplicate dataset'):
        LabelSpace.from_datasets(['voc', 'voc'])
    with pytest.raises(ValueError, match='Duplicate dataset'):
        LabelSpace([('a', ['x']), ('a', ['y'])])
    ls = LabelSpace.from_datasets(['synth_a', 'synth_b'])
    assert ls.num_classes == 14 and ls == LabelSpace(ls.as_dict())


# --- synthetic data -------------------------------------------------------------------------------

def test_synthetic_deterministic(tmp_path):
    kw = dict(num_train=3, num_val=2, image_size=32)
    a = synthetic.prepare_synthetic(tmp_path / 'a', seed=1, **kw)
    b = synthetic.prepare_synthetic(tmp_path / 'b', seed=1, **kw)
    c = synthetic.prepare_synthetic(tmp_path / 'c', seed=2, **kw)
    files = sorted(glob.glob(os.path.join(a.data_dir, 'synth_*', '*', '*.array_record*')))
    assert len(files) == 2 * len(synthetic.SYNTHETIC_DATASETS)
    diff = 0
    for f in files:
        data = open(f, 'rb').read()
        assert data == open(f.replace(a.data_dir, b.data_dir), 'rb').read()
        diff += data != open(f.replace(a.data_dir, c.data_dir), 'rb').read()
    assert diff == len(files)
    # Idempotent: a second call with the same arguments does not rebuild.
    mtime = os.path.getmtime(files[0])
    synthetic.prepare_synthetic(tmp_path / 'a', seed=1, **kw)
    assert os.path.getmtime(files[0]) == mtime
    # Other arguments on built data: refused, nothing deleted (a tiny config pointed at the demo's
    # data used to delete it and rebuild it at its own sizes).
    with pytest.raises(ValueError, match=r"holds synthetic data 2\.0\.0 built with .*'num_train': "
                                          r"3.*asks for data 2\.0\.0 with .*'num_train': 5"):
        synthetic.prepare_synthetic(tmp_path / 'a', num_train=5, num_val=2, image_size=32, seed=1)
    with pytest.raises(ValueError, match=r"'lookalike': 0\.6.*asks for .*'lookalike': 0\.0"):
        synthetic.prepare_synthetic(tmp_path / 'a', lookalike=0.0, seed=1, **kw)
    info = json.loads((tmp_path / 'a' / synthetic.INFO_FILE).read_text())
    info = {k: v for k, v in info.items() if k not in ('version', 'lookalike')}  # a data 1.x build
    (tmp_path / 'a' / synthetic.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"holds synthetic data 1\.x built with"):
        synthetic.prepare_synthetic(tmp_path / 'a', seed=1, **kw)
    assert all(open(f, 'rb').read() == open(f.replace(a.data_dir, b.data_dir), 'rb').read()
               for f in files)


def test_synthetic_records_and_relations_schema(synth):
    ls = LabelSpace.from_datasets(synthetic.SYNTHETIC_DATASETS)
    for d, name in enumerate(synthetic.SYNTHETIC_DATASETS):
        src = tfds.data_source(name, split='train', data_dir=synth.data_dir)
        assert len(src) == 30
        assert len(tfds.data_source(name, split='validation', data_dir=synth.data_dir)) == 4
        rec = src[0]
        assert rec['image'].dtype == np.uint8 and rec['image'].shape[2] == 3
        assert rec['label'].dtype == np.uint8 and rec['label'].shape == rec['image'].shape[:2] + (1,)
        assert set(np.unique(rec['label'])) <= set(range(ls.num_classes_of(d))) | {255}
    rel = json.load(open(synth.relations_path))
    assert rel and all(set(r) == {'from', 'to', 'kind'} for r in rel)
    pairs = {(r['from'], r['to']): r['kind'] for r in rel}
    for (a, b), kind in pairs.items():
        assert a in ls.display_names and b in ls.display_names
        assert a.split('/')[0] != b.split('/')[0]
        assert kind in ('synonym', 'subset')
        if kind == 'synonym':
            assert pairs.get((b, a)) == 'synonym'
        else:
            assert (b, a) not in pairs  # subset only from subset to superset
    for a, b in [('synth_a/stairway', 'synth_b/stairs'), ('synth_a/mountain', 'synth_b/hill'),
                 ('synth_b/ship', 'synth_c/boat')]:
        assert pairs[(a, b)] == pairs[(b, a)] == 'synonym'
    assert pairs[('synth_b/dirt track', 'synth_a/path')] == 'subset'
    assert pairs[('synth_c/lake', 'synth_a/water')] == 'subset'


def test_synthetic_fine_grained_classes_are_rare_and_synth_d_is_held_out():
    """Subset classes are drawn at RARE_WEIGHT of the others' frequency (so the parent's name
    dominates the shared look, see ms3_jax/data/synthetic.py); synth_d is not pretrained on."""
    for name, rare in (('synth_b', 'dirt track'), ('synth_c', 'lake')):
        spec = synthetic.SPEC_BY_NAME[name]
        pixels = np.zeros(len(spec.classes))
        for i in range(300):
            _, label = synthetic.generate_example(spec, np.random.default_rng([9, i]), 24)
            pixels += np.bincount(label[label != IGNORE_INDEX], minlength=len(spec.classes))
        share = pixels / pixels.sum()
        r = spec.class_names.index(rare)
        others = np.delete(share, r).mean()
        assert 0.1 < share[r] / others < 0.5, (name, share)
    assert synthetic.HELD_OUT_DATASET in synthetic.SYNTHETIC_DATASETS
    assert synthetic.HELD_OUT_DATASET not in synthetic.PRETRAIN_DATASETS


def _draw(spec, knobs, n=60, size=32, seed=3):
    return [synthetic.generate_example(spec, np.random.default_rng([seed, i]), size, knobs)
            for i in range(n)]


def test_synthetic_synonyms_are_one_family_never_the_same_texture():
    """Data 2.0: a concept is drawn per dataset (its own colour offset and scale, plus the
    dataset's look), so synonyms differ; with similarity 1 and no domain gap they coincide."""
    sim = lambda v: synthetic._style('synth_a', v, 0.5, 0.0)
    other = lambda v: synthetic._style('synth_b', v, 0.5, 0.0)
    for variant in ('stairs', 'mountain', 'boat', 'path_dirt'):
        (shift_a, scale_a), (shift_b, scale_b) = sim(variant), other(variant)
        assert np.abs(shift_a - shift_b).max() > 0.01 or abs(scale_a - scale_b) > 0.05, variant
        same = [synthetic._style(d, variant, 1.0, 0.0) for d in ('synth_a', 'synth_b')]
        np.testing.assert_array_equal(same[0][0], same[1][0])
        assert same[0][1] == same[1][1] == 1.0
    # The dataset's look: the same draws through synth_a's and synth_b's look differ in colour
    # at domain_gap 1 and not at 0 (same classes, concepts and regions: compare sky pixels).
    one = dict(synonym_similarity=1.0, cooccurrence=0.0, lookalike=0.0)
    means = {}
    for gap in (0.0, 1.0):
        knobs = synthetic.Difficulty(domain_gap=gap, **one)
        for name in ('synth_a', 'synth_b'):
            spec = synthetic.SPEC_BY_NAME[name]
            sky = spec.class_names.index('sky')
            px = np.concatenate([im[lab == sky] for im, lab in _draw(spec, knobs)])
            means[gap, name] = px.mean(0)
    assert np.abs(means[1.0, 'synth_a'] - means[1.0, 'synth_b']).max() > 10  # of 255
    assert np.abs(means[0.0, 'synth_a'] - means[0.0, 'synth_b']).max() < 4


def test_synthetic_lookalikes_move_towards_their_unrelated_twin():
    for variant, twin in synthetic.LOOKALIKES.items():
        shift, _ = synthetic._style('synth_c', variant, 1.0, 0.6)
        own, target = synthetic._mean_color(variant), synthetic._mean_color(twin)
        np.testing.assert_allclose(own + shift, own + 0.6 * (target - own), atol=1e-6)
        assert np.linalg.norm(own + shift - target) < 0.5 * np.linalg.norm(own - target)
    names = {(r['from'], r['to']) for r in synthetic.ground_truth_relations()}
    assert ('synth_c/sand', 'synth_a/path') not in names  # look-alikes are not relations


def test_synthetic_scenes_make_classes_co_occur():
    """Boats sit inside water: most pixels around a boat are water (labelled lake, or painted and
    ignored), and the sky is the top region; with cooccurrence 0 neither holds."""
    spec = synthetic.SPEC_BY_NAME['synth_c']
    boat, lake, sky = (spec.class_names.index(c) for c in ('boat', 'lake', 'sky'))

    def around_boats(knobs):
        near, total, sky_top = 0, 0, []
        for im, lab in _draw(spec, knobs, n=80, size=48):
            ring = synthetic._boundary_mask((lab == boat).astype(np.uint8), width=2) & (lab != boat)
            water = (lab == lake) | ((lab == 255) & (im[..., 2] > im[..., 0]))  # blue, ignored
            near, total = near + (ring & water).sum(), total + ring.sum()
            if (lab == sky).any():
                sky_top.append(np.nonzero(lab == sky)[0].mean() < lab.shape[0] / 2)
        return near / max(total, 1), np.mean(sky_top)
    water_scene, sky_scene = around_boats(synthetic.Difficulty(cooccurrence=1.0))
    water_iid, sky_iid = around_boats(synthetic.Difficulty(cooccurrence=0.0))
    assert water_scene > 0.6 and water_iid < 0.4, (water_scene, water_iid)
    assert sky_scene > 0.85 > sky_iid, (sky_scene, sky_iid)


def test_synthetic_small_images_with_empty_cells_generate():
    """Tiny images warp some Voronoi cells empty; scenes must not pick one as the sky's top cell
    or as a boat's water."""
    knobs = synthetic.Difficulty(cooccurrence=1.0)
    cases = [(spec, i) for spec in synthetic.SPECS for i in range(100)]
    cases.append((synthetic.SPEC_BY_NAME['synth_a'], 503))  # an empty water cell (crashed)
    for spec, i in cases:
        image, label = synthetic.generate_example(spec, np.random.default_rng([5, i]), 8, knobs)
        assert image.shape[:2] == label.shape and image.shape[0] == 8


def test_synthetic_held_out_has_a_concept_of_its_own():
    pretrain = {v for d in synthetic.PRETRAIN_DATASETS for _, vs in synthetic.SPEC_BY_NAME[d].classes
                for v in vs}
    new = [c for c, vs in synthetic.SPEC_BY_NAME['synth_d'].classes if not set(vs) & pretrain]
    assert new == ['sidewalk']
    rel = synthetic.ground_truth_relations()
    assert not [r for r in rel if 'synth_d/sidewalk' in (r['from'], r['to'])]
    with pytest.raises(ValueError, match=r"unknown fields \['gap'\]"):
        synthetic.prepare_synthetic('/nonexistent', gap=1.0)


# --- training pipeline ----------------------------------------------------------------------------

def test_pipeline_batch_format(synth):
    p = _pipe(synth)
    ls = p.label_space
    assert p.batch_size == 6 and ls.num_classes == 20
    np.testing.assert_allclose(p.weights, [1 / 3] * 3)
    it = p.make_iterator()
    seen, unlabeled = set(), 0
    for batch in _take(it, 3):
        spec = p.element_spec()
        assert set(batch) == set(spec)
        for k, (shape, dtype) in spec.items():
            assert batch[k].shape == shape and batch[k].dtype == dtype, k
        lab, did = batch['label'], batch['dataset_id']
        assert set(np.unique(lab)) <= set(range(ls.num_classes)) | {UNION_IGNORE}
        for y, d in zip(lab, did):
            v = y[y != UNION_IGNORE]
            unlabeled += v.size == 0  # data 2.0: a crop may hold only painted, unannotated stuff
            assert v.size == 0 or (v.min() >= ls.offsets[d] and v.max() < ls.offsets[d + 1])
        seen |= set(did.tolist())
    assert seen == {0, 1, 2} and unlabeled <= 2


def test_pipeline_weights_and_batch_split(synth):
    p = _pipe(synth, weights={'synth_a': 2, 'synth_b': 1, 'synth_c': 1}, global_batch_size=8,
              shard_index=1, shard_count=2)
    assert p.batch_size == 4 and p.weights == (0.5, 0.25, 0.25)
    p = _pipe(synth, weights=[3, 1, 1], global_batch_size=10)
    ids = np.concatenate([b['dataset_id'] for b in _take(p.make_iterator(), 2)])
    np.testing.assert_array_equal(np.bincount(ids, minlength=3), [12, 4, 4])
    with pytest.raises(ValueError, match='divisible'):
        _pipe(synth, global_batch_size=7, shard_count=2)


def test_pipeline_batch_to_global_jax_array(synth):
    batch = next(_pipe(synth, global_batch_size=8).make_iterator())
    mesh = Mesh(np.array(jax.devices()), ('data',))
    arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), batch['label'])
    assert arr.shape == (8, 32, 32)
    np.testing.assert_array_equal(np.asarray(arr), batch['label'])


def _palette_sources(num_per_dataset=(5, 3)):
    """Flat-coloured block images whose colour is palette[label]; label is a function of colour."""
    palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                        [245, 130, 48], [145, 30, 180], [70, 240, 240]], np.uint8)
    sources = []
    rng = np.random.default_rng(0)
    for d, n in enumerate(num_per_dataset):
        records = []
        for _ in range(n):
            h, w = int(rng.integers(40, 64)), int(rng.integers(40, 80))
            blocks = rng.integers(0, 4 if d == 0 else 3, (4, 5))
            label = np.kron(blocks, np.ones((16, 16), np.int64))[:h, :w].astype(np.uint8)
            records.append({'image': palette[label + (0 if d == 0 else 4)], 'label': label[..., None]})
        sources.append(records)
    ls = LabelSpace({'fix_a': ['c0', 'c1', 'c2', 'c3'], 'fix_b': ['c4', 'c5', 'c6']})
    return sources, ls, palette


def test_pipeline_keeps_image_and_label_aligned():
    sources, ls, palette = _palette_sources()
    cfg = augment.AugmentConfig.geometric_only(crop_size=40, base_size='original',
                                                scale_range=(0.5, 2.0))
    p = pipeline.TrainPipeline(['fix_a', 'fix_b'], label_space=ls, sources=sources,
                               global_batch_size=8, augment=cfg, shard_index=0, shard_count=1)
    n_pad = n_checked = 0
    for batch in _take(p.make_iterator(), 4):
        for img, lab in zip(batch['image'].astype(np.int32), batch['label']):
            pad = lab == UNION_IGNORE  # the fixture has no ignore pixels: -1 = padding only
            assert np.all(img[pad] == np.array(cfg.pad_value)), 'padding misaligned'
            n_pad += pad.any()
            valid = ~pad
            # Interior pixels (the 3x3 neighbourhood, inside the crop, shares the label) have exactly
            # the palette colour; only pixels next to a boundary may be blended by the bilinear resize.
            same = np.ones_like(valid)
            padded = np.pad(lab, 1, constant_values=-1)
            for dy in range(3):
                for dx in range(3):
                    same &= padded[dy:dy + lab.shape[0], dx:dx + lab.shape[1]] == lab
            interior = valid & same
            col = palette[np.where(valid, lab, 0)].astype(np.int32)
            err = np.abs(img - col).max(-1)
            assert interior.sum() > 0.3 * valid.sum()
            assert np.all(err[interior] <= 2), 'image and label misaligned'
            assert np.mean(err[valid] <= 2) > 0.6
            n_checked += 1
    assert n_pad > 0 and n_checked == 32
    # Without resampling (scale 1) crop, flip and padding keep every pixel consistent.
    cfg1 = augment.AugmentConfig.geometric_only(crop_size=40, base_size='original',
                                                 scale_range=(1.0, 1.0))
    p1 = pipeline.TrainPipeline(['fix_a', 'fix_b'], label_space=ls, sources=sources,
                                global_batch_size=8, augment=cfg1, shard_index=0, shard_count=1)
    for batch in _take(p1.make_iterator(), 2):
        for img, lab, d in zip(batch['image'], batch['label'], batch['dataset_id']):
            valid = lab != UNION_IGNORE
            local = lab[valid] - ls.offsets[d]
            np.testing.assert_array_equal(img[valid], palette[local + (0 if d == 0 else 4)])


def test_augment_photometric_only_changes_image():
    sources, _, _ = _palette_sources((1, 1))
    rec = sources[0][0]
    cfg = augment.AugmentConfig(crop_size=24, base_size='original', scale_range=(1.0, 1.0),
                                 color_jitter_prob=1.0, blur_prob=1.0, grayscale_prob=0.0)
    geo = augment.AugmentConfig.geometric_only(crop_size=24, base_size='original',
                                                scale_range=(1.0, 1.0))
    img1, lab1 = augment.augment(rec['image'], rec['label'][..., 0], np.random.default_rng(3), cfg)
    img2, lab2 = augment.augment(rec['image'], rec['label'][..., 0], np.random.default_rng(3), geo)
    np.testing.assert_array_equal(lab1, lab2)  # same crop/flip draws, labels untouched
    assert not np.array_equal(img1, img2)


def test_pipeline_deterministic(synth):
    a = _take(_pipe(synth, seed=3).make_iterator(), 3)
    b = _take(_pipe(synth, seed=3).make_iterator(), 3)
    c = _take(_pipe(synth, seed=4).make_iterator(), 1)
    _assert_batches_equal(a, b)
    assert not np.array_equal(a[0]['image'], c[0]['image'])


@pytest.mark.slow  # grain worker processes
def test_pipeline_same_batches_with_workers(synth):
    """worker_count changes neither the batches nor the checkpoint state (resume 2 -> 0 workers)."""
    flags.FLAGS.mark_as_parsed()
    ref = _take(_pipe(synth, seed=5).make_iterator(), 4)
    it = _pipe(synth, seed=5, loader=pipeline.LoaderOptions(worker_count=2)).make_iterator()
    try:
        _assert_batches_equal(ref[:2], _take(it, 2))
        state = it.get_state()
    finally:
        it.close()
    it0 = _pipe(synth, seed=5).make_iterator()
    it0.set_state(state)
    _assert_batches_equal(ref[2:], _take(it0, 2))
    with pytest.raises(ValueError, match='different pipeline'):
        _pipe(synth, seed=6).make_iterator().set_state(state)


def test_pipeline_resume_from_orbax_checkpoint(synth, tmp_path):
    ref = _take(_pipe(synth, seed=7).make_iterator(), 4)
    it = _pipe(synth, seed=7).make_iterator()
    _take(it, 2)
    state = {'step': np.array(2, np.int32), 'w': np.arange(3.0)}
    with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
        mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=pipeline.checkpoint_save_args(it)))
        mngr.wait_until_finished()
    del it
    fresh = _pipe(synth, seed=7).make_iterator()
    with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), data=pipeline.checkpoint_restore_args(fresh)))
    assert int(restored['state']['step']) == 2
    _assert_batches_equal(ref[2:], _take(restored['data'], 2))


def test_process_slices_make_the_single_process_batches(synth):
    """2 processes' batches concatenate to exactly the 1-process global batches (same records, same
    augmentation), and one epoch's records are disjoint across the processes."""
    whole = _take(_pipe(synth, global_batch_size=6, with_record_ids=True).make_iterator(), 4)
    parts = [_take(_pipe(synth, global_batch_size=6, shard_index=i, shard_count=2,
                         with_record_ids=True).make_iterator(), 4) for i in range(2)]
    for w, a, b in zip(whole, *parts):
        assert a['image'].shape[0] == 3
        for k in w:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), w[k], err_msg=k)
    ids = [{(d, r) for b in p for d, r in zip(b['dataset_id'].tolist(), b['record_index'].tolist())}
           for p in parts]
    assert ids[0] and ids[1] and not ids[0] & ids[1]  # 12 of 135 records: within one epoch


# --- evaluation -----------------------------------------------------------------------------------

def test_eval_dataset(synth):
    ls = LabelSpace.from_datasets(synth.dataset_names)
    ds = eval_data.make_eval_dataset('synth_b', label_space=ls, data_dir=synth.data_dir,
                                    short_side=40)
    assert len(ds) == 4
    for ex in ds:
        h, w = ex['label'].shape
        assert min(h, w) == 40 and ex['image'].shape == (h, w, 3) and ex['dataset_id'] == 1
        assert set(np.unique(ex['label'])) <= set(ls.class_range('synth_b')) | {UNION_IGNORE}
        assert ex['file_name'].startswith('synth_b_validation_')
    halves = [eval_data.make_eval_dataset('synth_b', label_space=ls, data_dir=synth.data_dir,
                                         shard_index=i, shard_count=2) for i in range(2)]
    names = [{ex['file_name'] for ex in h} for h in halves]
    assert len(names[0]) == len(names[1]) == 2 and not names[0] & names[1]


@pytest.mark.parametrize('hw,crop,stride', [((50, 70), 32, 20), ((32, 32), 32, 21),
                                            ((20, 45), (32, 16), (24, 10)), ((64, 33), 16, 16)])
def test_sliding_window_crops(hw, crop, stride):
    h, w = hw
    ch, cw = (crop, crop) if np.isscalar(crop) else crop
    sh, sw = (stride, stride) if np.isscalar(stride) else stride
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3)).astype(np.uint8)
    crops, pos = evaluate.sliding_window_crops(image, crop, stride, pad_value=7)
    h_grids = max(h - ch + sh - 1, 0) // sh + 1
    w_grids = max(w - cw + sw - 1, 0) // sw + 1
    assert crops.shape == (h_grids * w_grids, ch, cw, 3) and pos.shape == (h_grids * w_grids, 4)
    cover = np.zeros((h, w), int)
    for k, (y1, x1, y2, x2) in enumerate(pos):
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert y2 - y1 == min(ch, h) and x2 - x1 == min(cw, w)  # clamped inside, full size if possible
        np.testing.assert_array_equal(crops[k, :y2 - y1, :x2 - x1], image[y1:y2, x1:x2])
        assert np.all(crops[k, y2 - y1:] == 7) and np.all(crops[k, :, x2 - x1:] == 7)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    # The last window of each row/column touches the border (MMSeg clamps it back inside).
    assert pos[:, 2].max() == h and pos[:, 3].max() == w
    merged = evaluate.merge_sliding_window(crops.astype(np.float32), pos, h, w)
    np.testing.assert_allclose(merged, image.astype(np.float32))
