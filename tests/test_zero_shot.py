"""Zero-shot segmentation (paper Fig. 3): CLI outputs, a float64 NumPy reference of the label map,
the error messages, and the Colab notebook run headless -- all on one quick demo workdir."""
import json
import os

from absl import flags
import numpy as np
import pytest
from PIL import Image

from ms3_jax import zero_shot
from ms3_jax.evaluation import visualize
from ms3_jax.testing.paths import ROOT

flags.FLAGS.mark_as_parsed()

NAMES = ("sky", "grass", "stairway")  # union classes of stage 1 (rows 0-2 of its npz)
SHORT_SIDE = 64


@pytest.fixture(scope="module")
def demo_dir(quick_demo):
    """configs/demo.py:quick's workdir (conftest: one run per session, shared with test_demo)."""
    return quick_demo[0]


@pytest.fixture(scope="module")
def images(demo_dir, tmp_path_factory):
    """A synthetic validation image as PNG and an odd-sized JPEG crop (not a multiple of 8)."""
    out = tmp_path_factory.mktemp("zero_shot_images")
    image = zero_shot.synthetic_sample(demo_dir, "synth_a", 0)
    png, jpg = str(out / "val0.png"), str(out / "crop.jpg")
    Image.fromarray(image).save(png)
    Image.fromarray(image[3:40, 5:66]).save(jpg, quality=95)
    return png, jpg


def _interp(n_in: int, n_out: int) -> np.ndarray:
    """float64 [n_out, n_in] bilinear weights, torch `align_corners=False` (written independently)."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[o, i0] += 1 - frac
        m[o, i1] += frac
    return m


def test_input_size_is_a_multiple_of_the_stride():
    assert zero_shot.input_size(48, 72, 448, 8) == (448, 672)
    assert zero_shot.input_size(37, 61, None, 8) == (40, 64)
    assert zero_shot.input_size(3, 100, 4, 16) == (16, 128)


@pytest.mark.slow
def test_cli_writes_labels_and_overlay(demo_dir, images, tmp_path):
    out = str(tmp_path / "out")
    written = zero_shot.main(["--workdir", demo_dir, "--image", *images, "--classes",
                              "sky, grass,stairway", "--out", out, "--short_side", str(SHORT_SIDE)])
    assert len(written) == 2
    for path, (labels_png, overlay_png) in zip(images, written):
        stem = os.path.splitext(os.path.basename(path))[0]
        assert labels_png == os.path.join(out, f"{stem}_labels.png")
        assert overlay_png == os.path.join(out, f"{stem}_overlay.png")
        with Image.open(path) as im:
            w, h = im.size
        with Image.open(labels_png) as im:
            assert im.mode == "P" and im.size == (w, h)
            labels = np.asarray(im)
            lut = np.asarray(im.getpalette()[:3 * len(NAMES)]).reshape(-1, 3)
        assert labels.max() < len(NAMES)
        np.testing.assert_array_equal(lut, visualize.palette(len(NAMES)))
        mapping = json.loads(open(os.path.join(out, f"{stem}_labels.json")).read())
        assert mapping == {str(i): n for i, n in enumerate(NAMES)}
        with Image.open(overlay_png) as im:
            assert im.mode == "RGB"
            assert im.size[0] > w and im.size[1] >= h  # legend appended on the right
            left = np.asarray(im)[:h, :w]
        # The left part is the colour blend of exactly this label map.
        colours = visualize.palette(len(NAMES)).astype(np.float32)
        image = zero_shot.read_image(path).astype(np.float32)
        np.testing.assert_allclose(left, np.round(0.5 * image + 0.5 * colours[labels]), atol=1)


@pytest.mark.slow
def test_label_map_matches_float64_reference(demo_dir, images):
    # A pretraining workdir: the stage-1 text model is found from config.text.embeddings.
    seg = zero_shot.ZeroShotSegmenter.from_workdir(os.path.join(demo_dir, "pretrain"),
                                                   short_side=SHORT_SIDE)
    assert seg.text_workdir == os.path.join(demo_dir, "text_adapt")
    t_KxC = seg.embed_classes(NAMES)
    # Same prompts + learned context as stage 1's T (what pretraining paired with, Eq. 1).
    npz = np.load(os.path.join(demo_dir, "text_adapt", "text_embeddings.npz"))
    rows = [list(npz["names"]).index(f"synth_a/{n}") for n in NAMES]
    np.testing.assert_allclose(t_KxC, npz["embeddings"][rows], atol=1e-5)

    for path in images:
        image = zero_shot.read_image(path)
        labels, scores = seg.segment(image, NAMES)
        h, w = image.shape[:2]
        assert labels.shape == (h, w) and labels.dtype == np.int32
        assert scores.shape == (h, w, len(NAMES))

        emb = seg.pixel_embeddings(image).astype(np.float64)
        hh, ww = seg.preprocess(image).shape[:2]
        stride = 4 if seg.model.heads_at == "decoder" else seg.model.backbone.output_stride
        assert emb.shape[:2] == (hh // stride, ww // stride) and hh % 8 == 0 and ww % 8 == 0
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        text = t_KxC.astype(np.float64)
        text /= np.linalg.norm(text, axis=-1, keepdims=True)
        cos = np.einsum("hwc,kc->hwk", emb, text)
        ref = np.einsum("oh,hwk,pw->opk", _interp(emb.shape[0], h), cos, _interp(emb.shape[1], w))
        np.testing.assert_allclose(scores, ref, atol=1e-4)
        top2 = np.sort(ref, axis=-1)
        clear = top2[..., -1] - top2[..., -2] > 1e-4
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(labels[clear], ref.argmax(-1)[clear])


@pytest.mark.slow
def test_stage1_workdir_segments_alone(demo_dir, images):
    """A stage-1 workdir holds both parts: its image encoder (CLIP's vision tower: dense patch
    embeddings, DenseCLIP-style) and the text model."""
    from ms3_jax.models import clip_vision
    text_dir = os.path.join(demo_dir, "text_adapt")
    seg = zero_shot.ZeroShotSegmenter.from_workdir(text_dir, short_side=SHORT_SIDE)
    assert (seg.workdir, seg.text_workdir) == (text_dir, text_dir)
    assert isinstance(seg.model, clip_vision.PixelEncoder) and seg.multiple == 8  # the patch size
    image = zero_shot.read_image(images[1])
    # I: the tower's dense output of the CLIP-normalised pixels, unit norm (float64 reference).
    x = seg.preprocess(image).astype(np.float64) / 255.0
    pixels = (x - np.asarray(seg.model.mean)) / np.asarray(seg.model.std)
    dense = np.asarray(seg.model.tower.apply(seg.variables, pixels[None].astype(np.float32))["dense"][0],
                       np.float64)
    np.testing.assert_allclose(seg.pixel_embeddings(image),
                               dense / np.linalg.norm(dense, axis=-1, keepdims=True), atol=2e-5)
    labels, _ = seg.segment(image, "sky,grass")
    assert labels.shape == image.shape[:2] and labels.max() < 2
    with pytest.raises(ValueError, match="no momentum encoder"):
        zero_shot.ZeroShotSegmenter.from_workdir(text_dir, ema=True)


def _copy_config(src: str, dst: str, **text) -> None:
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["text"].update(text)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.mark.slow
def test_errors_name_the_problem(demo_dir, images, tmp_path):
    out = str(tmp_path / "out")
    # --verbose: the exceptions themselves (without it: one line, exit code 2, tests/test_cli_inputs.py)
    args = ["--workdir", demo_dir, "--out", out, "--short_side", str(SHORT_SIDE), "--verbose"]
    with pytest.raises(ValueError, match="empty"):
        zero_shot.main(args + ["--image", images[0], "--classes", " "])
    with pytest.raises(ValueError, match="empty"):
        zero_shot.check_classes([])
    with pytest.raises(ValueError, match="duplicate class names: 'sky' / 'Sky'"):
        zero_shot.main(args + ["--image", images[0], "--classes", "sky,grass, Sky"])

    missing = str(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match=f"image not found: {missing}"):
        zero_shot.main(args + ["--image", images[0], missing, "--classes", "sky"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"cannot read image {broken}"):
        zero_shot.main(args + ["--image", str(broken), "--classes", "sky"])
    assert not os.path.exists(out)  # inputs are checked before anything is written

    pre = os.path.join(demo_dir, "pretrain")
    no_text = str(tmp_path / "no_text")
    _copy_config(pre, no_text, embeddings=str(tmp_path / "elsewhere" / "text_embeddings.npz"))
    os.symlink(os.path.join(pre, "checkpoints"), os.path.join(no_text, "checkpoints"))
    with pytest.raises(FileNotFoundError, match="no stage-1 text model") as e:
        zero_shot.ZeroShotSegmenter.from_workdir(no_text)
    assert str(tmp_path / "elsewhere") in str(e.value) and "configs/text_adapt.py" in str(e.value)
    with pytest.raises(FileNotFoundError, match=f"text_workdir {pre} has no stage-1 text model"):
        zero_shot.ZeroShotSegmenter.from_workdir(no_text, text_workdir=pre)
    # ... and with an explicit stage-1 workdir it works.
    seg = zero_shot.ZeroShotSegmenter.from_workdir(
        no_text, text_workdir=os.path.join(demo_dir, "text_adapt"), short_side=SHORT_SIDE)
    assert seg.embed_classes(["sky"]).shape == (1, 32)

    no_ckpt = str(tmp_path / "no_ckpt")
    _copy_config(pre, no_ckpt)
    with pytest.raises(FileNotFoundError, match=f"no checkpoints in {no_ckpt}"):
        zero_shot.ZeroShotSegmenter.from_workdir(no_ckpt)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        zero_shot.ZeroShotSegmenter.from_workdir(str(tmp_path))


@pytest.mark.slow
def test_notebook_runs_headless(demo_dir, tmp_path):
    import nbclient
    import nbformat

    nb = nbformat.read(os.path.join(ROOT, "notebooks", "zero_shot.ipynb"), as_version=4)
    for cell in nb.cells:
        assert not cell.get("outputs"), "commit the notebook with outputs cleared"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = (f"WORKDIR = {demo_dir!r}\nCLASSES = 'sky,grass,stairs'\nIMAGE = None\n"
                        f"SHORT_SIDE = {SHORT_SIDE}")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert not any(o.output_type == "error" for o in outputs)
