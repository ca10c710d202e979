"""The command-line tools take bad files in their stride (issue 31): `zero_shot`, `predict` and
`export` turn every bad input or destination into ONE line on stderr, `error: <file>: <reason>`,
exit code 2, no traceback -- found before any model or checkpoint loads (the loading functions
are patched to fail here, so no test compiles a model); `predict` skips unreadable files of a
folder; 16-bit images are scaled, not clipped; output names never collide; writes are atomic;
a bad `text.embeddings` npz names the file and the reason."""
import errno
import io
import os
import re
import struct
import subprocess
import sys
import types
import zlib

from absl import flags
import numpy as np
import pytest
from PIL import Image

from ms3_jax import export, predict, zero_shot
from ms3_jax.data import images
from ms3_jax.engine import checkpointing, exit_codes
from ms3_jax.evaluation import visualize
from ms3_jax.files import safe
from ms3_jax.method import text_embeddings
from ms3_jax.models import torch_format
from ms3_jax.testing.paths import ROOT, subprocess_env

flags.FLAGS.mark_as_parsed()

# C++ runtime lines some installs print at `import jax` (a CUDA plugin finding no GPU): not ours.
RUNTIME_NOISE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::)")


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _bomb(path) -> None:
    """A valid tiny PNG whose header claims 20000 x 20000 pixels (4e8 > 2 * PIL's limit)."""
    data = bytearray(_png_bytes(_noise(4, 4)))
    data[16:24] = struct.pack(">II", 20000, 20000)  # IHDR width, height ...
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # ... and its CRC
    path.write_bytes(bytes(data))


def _truncated(path) -> None:
    """The first half of a real PNG: the header reads, the pixel data ends early."""
    data = _png_bytes(_noise(64, 64))
    path.write_bytes(data[:len(data) // 2])
    with Image.open(path) as im:  # the case is meaningful: opening works, decoding fails
        with pytest.raises(OSError):
            im.load()


def _make(case: str, tmp_path, monkeypatch) -> str:
    """The bad input of `case` in tmp_path; returns its path."""
    path = tmp_path / {"directory": "folder.png", "float": "float.tif"}.get(case, f"{case}.png")
    if case == "empty":
        path.write_bytes(b"")
    elif case == "not_an_image":
        path.write_text("this is text, not a PNG\n")
    elif case == "truncated":
        _truncated(path)
    elif case == "directory":
        path.mkdir()
    elif case == "bomb":
        _bomb(path)
    elif case == "bomb_warning":  # above MAX_IMAGE_PIXELS, below 2x: PIL only warns
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
        Image.fromarray(_noise(20, 20)).save(path)
    elif case == "float":
        Image.fromarray(np.ones((8, 8), np.float32)).save(path)
    elif case != "missing":
        raise AssertionError(case)
    return str(path)


# case -> what the one-line error says (besides the file's name)
BAD_IMAGES = {
    "missing": "not found",
    "empty": "empty",
    "not_an_image": "not an image",
    "truncated": "truncated",
    "directory": "directory|folder",
    "bomb": "decompression bomb",
    "bomb_warning": "decompression bomb",
    "float": "mode F",
}


def _refuse(*args, **kwargs):
    raise AssertionError("the model / checkpoint was loaded before the inputs were checked")


def _one_error_line(capsys, *must_contain: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in must_contain:
        assert re.search(text, lines[0]), (text, lines[0])
    return lines[0]


def _exit_code(fn, argv) -> int:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return e.value.code


@pytest.mark.parametrize("tool", ["zero_shot", "predict"])
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_is_one_line_before_the_model_loads(tool, case, tmp_path, monkeypatch, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(_noise(8, 8)).save(good)
    bad = _make(case, tmp_path, monkeypatch)
    out = tmp_path / "out"
    monkeypatch.setattr(zero_shot.ZeroShotSegmenter, "from_workdir", _refuse)
    monkeypatch.setattr(predict, "Segmentor", _refuse)
    argv = ["--workdir", str(tmp_path), "--image", str(good), bad, "--out", str(out)]
    if tool == "zero_shot":
        code = _exit_code(zero_shot.main, argv + ["--classes", "sky,grass"])
    else:
        code = _exit_code(predict.main, argv)
    assert code == exit_codes.USAGE == 2
    _one_error_line(capsys, re.escape(bad), BAD_IMAGES[case])
    assert not out.exists()  # nothing written either


def test_verbose_reraises_and_bugs_are_not_usage_errors(tmp_path, monkeypatch):
    """`--verbose`: the usage error's traceback; an exception that is a bug (here a KeyError from
    the model loading) is never reported as a usage error (exit code 1, its traceback)."""
    empty = _make("empty", tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="empty"):
        zero_shot.main(["--workdir", str(tmp_path), "--image", empty, "--classes", "sky",
                        "--out", str(tmp_path / "o"), "--verbose"])
    good = tmp_path / "good.png"
    Image.fromarray(_noise(8, 8)).save(good)

    def bug(*args, **kwargs):
        raise KeyError("params")
    monkeypatch.setattr(predict, "Segmentor", bug)
    with pytest.raises(KeyError):
        predict.main(["--workdir", str(tmp_path), "--image", str(good), "--out", str(tmp_path / "o")])


class _FakeSegmentor:
    """Stands in for the fine-tuned model: label 1 where the red channel is > 127."""
    class_names = ("dark", "bright")
    eval: dict = {}

    def __init__(self, workdir, step=None):
        pass

    def predict(self, image, **kwargs):
        return (image[..., 0] > 127).astype(np.int32)


def test_predict_folder_skips_broken_files_with_a_warning(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(_noise(8, 8, 1)).save(folder / "a.png")
    Image.fromarray(_noise(8, 8, 2)).save(folder / "sub" / "c.png")
    _truncated(folder / "b.png")
    monkeypatch.setattr(predict, "Segmentor", _FakeSegmentor)
    written = predict.main(["--workdir", "W", "--image", str(folder), "--out", str(tmp_path / "out")])
    assert [os.path.basename(w[0]) for w in written] == ["a_labels.png", "c_labels.png"]
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 2 and "Traceback" not in err
    assert str(folder / "b.png") in warnings[0] and "truncated" in warnings[0]
    assert "skipped 1" in warnings[1] and "of 3" in warnings[1]
    # ... and a folder of broken files only: exit code 2, the model never loaded.
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    _truncated(only_bad / "x.png")
    (only_bad / "y.png").write_bytes(b"")
    monkeypatch.setattr(predict, "Segmentor", _refuse)
    assert _exit_code(predict.main, ["--workdir", "W", "--image", str(only_bad),
                                     "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([w for w in err.splitlines() if w.startswith("WARNING")]) == 2
    assert err.splitlines()[-1].startswith("error: no readable image")


def test_output_names_never_collide(tmp_path, monkeypatch, capsys):
    """a.png a.jpg sub/a.png: three sets of outputs (`a_*`, `a_jpg_*`, `a_png_*`), each the
    labels of its own input; the renaming is logged. An output that would overwrite an input
    is refused before the model loads."""
    (tmp_path / "sub").mkdir()
    inputs = [tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "sub" / "a.png"]
    for i, path in enumerate(inputs):
        value = np.full((6, 9, 3), (0, 255, 0)[i], np.uint8)  # labels 0, 1, 0
        value[..., 1] = i  # distinct images
        Image.fromarray(value).save(path, quality=100)
    monkeypatch.setattr(predict, "Segmentor", _FakeSegmentor)
    out = tmp_path / "out"
    written = predict.main(["--workdir", "W", "--image", *map(str, inputs), "--out", str(out)])
    assert [os.path.basename(o) for _, o in written] == [
        "a_overlay.png", "a_jpg_overlay.png", "a_png_overlay.png"]
    for (labels_png, _), want in zip(written, (0, 1, 0)):
        assert np.all(np.asarray(Image.open(labels_png)) == want)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "a_jpg_*" in notes[0] and str(inputs[2]) in notes[1]
    assert sorted(os.listdir(out)) == sorted(f"{s}_{k}" for s in ("a", "a_jpg", "a_png")
                                             for k in ("labels.png", "labels.json", "overlay.png"))
    # Case-insensitive file systems: A.PNG and a.png are one name too.
    assert visualize.output_stems(["x/A.PNG", "a.png", "a_png.gif"]) == ["A", "a_png_2", "a_png"]
    assert "a.png would share the output name a_*" in capsys.readouterr().err

    overlay_input = out / "a_overlay.png"  # re-run on the output folder, into itself
    monkeypatch.setattr(predict, "Segmentor", _refuse)
    assert _exit_code(predict.main, ["--workdir", "W", "--image", str(tmp_path / "a.png"),
                                     str(overlay_input), "--out", str(out)]) == 2
    _one_error_line(capsys, "would overwrite the input", re.escape(str(overlay_input)))


@pytest.mark.parametrize("fmt", ["I;16 png", "I;16B tiff", "I tiff"])
def test_16_bit_image_gives_the_model_input_of_its_8_bit_version(fmt, tmp_path):
    """A 16-bit image made as the 8-bit one * 257 reads to the same pixels (v / 257, rounded), so
    the same network input, where PIL's convert('RGB') clipped 99.6 % of them to 255."""
    grey = np.random.default_rng(3).integers(0, 256, (21, 34)).astype(np.uint8)
    eight = tmp_path / "eight.png"
    Image.fromarray(grey).save(eight)
    dtype = {"I;16 png": np.uint16, "I;16B tiff": ">u2", "I tiff": np.int32}[fmt]
    mode, ext = fmt.split()
    sixteen = tmp_path / f"sixteen.{ext}"
    Image.fromarray((grey.astype(np.int32) * 257).astype(dtype)).save(sixteen)
    with Image.open(sixteen) as im:
        assert im.mode == mode
    a, b = images.read_image(eight), images.read_image(sixteen)
    assert b.dtype == np.uint8 and b.shape == (21, 34, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b[..., 0], grey)
    network = types.SimpleNamespace(short_side=64, multiple=8)  # what `segment` feeds the model
    np.testing.assert_array_equal(zero_shot.ZeroShotSegmenter.preprocess(network, a),
                                  zero_shot.ZeroShotSegmenter.preprocess(network, b))
    # The other modes go through PIL's convert('RGB'): a palette image reads as its colours.
    p = Image.fromarray(grey).convert("P")
    p.save(tmp_path / "p.png")
    np.testing.assert_array_equal(images.read_image(tmp_path / "p.png"),
                                  np.asarray(p.convert("RGB")))


# --- export ---------------------------------------------------------------------------------

def _fake_workdir(path, config=None, steps=(5,)):
    """config.json + checkpoints/<step>/ (empty): enough for the checks that run before a restore."""
    checkpointing.write_config(str(path), config if config is not None else {"model": {}})
    for step in steps:
        os.makedirs(os.path.join(path, checkpointing.CHECKPOINT_DIR, str(step)))
    return str(path)


@pytest.mark.parametrize("case", ["missing_dir", "read_only_dir", "bad_extension", "is_a_directory"])
def test_export_checks_the_destination_before_restoring(case, tmp_path, monkeypatch, capsys):
    wd = _fake_workdir(tmp_path / "wd")
    monkeypatch.setattr(checkpointing, "restore_state", _refuse)
    out = {"missing_dir": tmp_path / "nope" / "b.pth", "read_only_dir": tmp_path / "ro" / "b.pth",
           "bad_extension": tmp_path / "b.bin", "is_a_directory": tmp_path / "d.pth"}[case]
    reason = {"missing_dir": "does not exist", "read_only_dir": "cannot write",
              "bad_extension": r"\.pth, \.pt or \.safetensors", "is_a_directory": "directory"}[case]
    if case == "read_only_dir":
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        real_access = os.access  # root ignores the mode bits: pretend for this directory
        monkeypatch.setattr(os, "access", lambda p, m, *a, **k: (
            False if os.path.abspath(p) == str(ro) and m & os.W_OK else real_access(p, m, *a, **k)))
    if case == "is_a_directory":
        out.mkdir()
    assert _exit_code(export.main, ["--workdir", wd, "--out", str(out)]) == 2
    _one_error_line(capsys, re.escape(str(out) if case != "bad_extension" else "b.bin"), reason)
    if case == "read_only_dir":
        (tmp_path / "ro").chmod(0o755)


@pytest.mark.parametrize("case", ["demo", "stage1", "no_checkpoint", "missing"])
def test_export_refuses_a_workdir_without_a_usable_checkpoint(case, tmp_path, monkeypatch, capsys):
    """A demo workdir (runs in subdirectories: the line names W/pretrain), a stage-1 workdir
    (CLIP's image tower, no DeepLab encoder), no checkpoint step, no workdir: one line, exit 2,
    before any restore."""
    wd = tmp_path / "wd"
    if case == "demo":
        _fake_workdir(wd / "pretrain", {"mode": "pretrain", "model": {}})
        _fake_workdir(wd / "text_adapt", {"mode": "text_adapt"})
    elif case == "stage1":
        _fake_workdir(wd, {"mode": "text_adapt"})
    elif case == "no_checkpoint":
        _fake_workdir(wd, steps=())
    monkeypatch.setattr(checkpointing, "restore_state", _refuse)
    assert _exit_code(export.main, ["--workdir", str(wd), "--out", str(tmp_path / "b.pth")]) == 2
    reason = {"demo": re.escape(f"--workdir {wd / 'pretrain'}"), "stage1": "stage-1",
              "no_checkpoint": "no checkpoints", "missing": "not found"}[case]
    _one_error_line(capsys, re.escape(str(wd)), reason)
    assert not (tmp_path / "b.pth").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_pth_export_on_a_full_disk_leaves_nothing_half_written(existing, tmp_path, monkeypatch,
                                                               capsys):
    import torch
    out = tmp_path / "backbone.pth"
    if existing:
        out.write_bytes(b"the previous export")

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"\0" * 4096)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    sd = {"stem.0.weight": np.ones((64, 64), np.float32)}
    with pytest.raises(OSError) as e:
        torch_format.write_state_dict(sd, str(out))
    assert e.value.errno == errno.ENOSPC and str(out) in str(e.value)
    assert os.listdir(tmp_path) == (["backbone.pth"] if existing else [])  # no temporary left
    if existing:
        assert out.read_bytes() == b"the previous export"
    with pytest.raises(SystemExit) as exit_:  # how the CLI reports it
        with exit_codes.usage_errors():
            torch_format.write_state_dict(sd, str(out))
    assert exit_.value.code == 2
    _one_error_line(capsys, re.escape(str(out)), "No space left")
    # Known too small beforehand: refused before writing anything.
    monkeypatch.setattr(safe, "free_bytes", lambda directory: 100)
    with pytest.raises(safe.NotEnoughSpace, match="not enough space"):
        torch_format.write_state_dict(sd, str(out))
    assert os.listdir(tmp_path) == (["backbone.pth"] if existing else [])


def test_cli_outputs_are_written_atomically(tmp_path, monkeypatch):
    """`write_outputs` (zero_shot, predict): a disk full while writing leaves the previous
    outputs as they were and no temporary file."""
    image, labels = _noise(6, 6), np.zeros((6, 6), np.int32)
    visualize.write_outputs(str(tmp_path), "x", image, labels, ["a", "b"])
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    monkeypatch.setattr(Image.Image, "save", lambda self, f, *a, **k: (
        f.write(b"partial"), (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left"))))
    with pytest.raises(OSError):
        visualize.write_outputs(str(tmp_path), "x", image, labels + 1, ["a", "b"])
    assert sorted(before) == ["x_labels.json", "x_labels.png", "x_overlay.png"]
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


# --- text.embeddings npz --------------------------------------------------------------------

def _label_space():
    from ms3_jax.data.label_space import LabelSpace
    return LabelSpace.from_datasets(["synth_a"])


def _valid_npz(path) -> None:
    ls = _label_space()
    t = np.random.default_rng(0).normal(size=(ls.num_classes, 4))
    text_embeddings.save_text_embeddings(str(path), ls, t / np.linalg.norm(t, axis=1, keepdims=True),
                                         "template")


@pytest.mark.parametrize("case", ["empty", "truncated", "garbage", "npy", "pickled", "no_keys",
                                  "directory"])
def test_bad_text_embeddings_npz_names_the_file_and_reason(case, tmp_path):
    path = tmp_path / "text_embeddings.npz"
    if case == "empty":
        path.write_bytes(b"")
    elif case in ("truncated", "garbage"):
        _valid_npz(tmp_path / "ok.npz")
        data = (tmp_path / "ok.npz").read_bytes()
        path.write_bytes(data[:len(data) // 2] if case == "truncated" else
                         np.random.default_rng(1).bytes(len(data)))
    elif case == "npy":
        with open(path, "wb") as f:
            np.save(f, np.ones(3))
    elif case == "pickled":
        np.savez(path, names=np.asarray([{"a": 1}], dtype=object), embeddings=np.ones((1, 4)))
    elif case == "no_keys":
        np.savez(path, other=np.ones(3))
    elif case == "directory":
        path.mkdir()
    reason = {"empty": "empty", "truncated": "truncated or damaged", "garbage": "not an .npz",
              "npy": "not an .npz", "pickled": "Object arrays", "no_keys": "lacks",
              "directory": "directory"}[case]
    with pytest.raises(ValueError) as e:
        text_embeddings.load_text_embeddings(str(path), _label_space())
    message = str(e.value)
    assert message.startswith(str(path)) and reason in message, message
    assert "allow_pickle=True" not in message and "\n" not in message


def test_text_embeddings_are_written_atomically(tmp_path):
    _valid_npz(tmp_path / "T.npz")
    assert os.listdir(tmp_path) == ["T.npz"]
    assert text_embeddings.load_text_embeddings(str(tmp_path / "T.npz"), _label_space()).shape[1] == 4


# --- the one real process -------------------------------------------------------------------

@pytest.mark.slow
def test_real_exit_code_and_stderr_of_a_bad_image(tmp_path):
    """`python -m ms3_jax.zero_shot` on a truncated PNG: exit code 2, one `error:` line naming
    the file, no traceback (the workdir does not even exist: the image is checked first)."""
    bad = tmp_path / "cut.png"
    _truncated(bad)
    proc = subprocess.run(
        [sys.executable, "-m", "ms3_jax.zero_shot", "--workdir", str(tmp_path / "no_workdir"),
         "--image", str(bad), "--classes", "sky", "--out", str(tmp_path / "out")],
        env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == exit_codes.USAGE, proc.stderr
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not RUNTIME_NOISE.match(line)]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: cannot read image {bad}:") and "truncated" in lines[0]
    assert not proc.stdout.strip()
