"""Results files: written atomically (a failed overwrite keeps the previous file and says why), and read
back with errors that name the file and the damage."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lightning_influence import InfluenceResults, compute_influence
from lightning_influence.errors import ResultsFileError

from .problems import digits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def results():
    train, val = digits(torch.float32, n_train=120)
    torch.manual_seed(0)
    return compute_influence(nn.Linear(64, 10), train, val, num_queries=3, solver="exact", damping=0.1)


def assert_same(a: InfluenceResults, b: InfluenceResults) -> None:
    assert torch.equal(a.scores, b.scores) and torch.equal(a.query_indices, b.query_indices)
    assert torch.equal(a.train_indices, b.train_indices) and a.settings == b.settings


# ---------------------------------------------------------------- atomic results file
def test_save_roundtrip_keeps_umask_permissions(tmp_path, results):
    path = tmp_path / "results.pt"
    results.save(path)
    assert_same(InfluenceResults.load(path), results)
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert os.listdir(tmp_path) == ["results.pt"]  # no temporary file left


def test_failed_overwrite_keeps_the_old_file_and_says_why(tmp_path, results, monkeypatch):
    path = tmp_path / "results.pt"
    results.save(path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):  # writes a little, then the disk is full
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ResultsFileError, match=rf"could not write {path}: \[Errno 28 ENOSPC\] No space left on "
                                               r"device; the previous results.pt is unchanged\. Free space in .*: "
                                               r"[0-9.]+ [KMGT]?i?B"):
        results.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["results.pt"]
    assert_same(InfluenceResults.load(path), results)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics")
def test_file_size_limit_keeps_the_old_file(tmp_path):
    """The reported fault itself: an overwrite beyond the file-size limit (in a subprocess, whose limit
    cannot disturb the test run)."""
    script = textwrap.dedent(f"""
        import os, resource, signal, torch
        from lightning_influence import InfluenceResults
        from lightning_influence.errors import ResultsFileError
        path = {str(tmp_path / "results.pt")!r}
        small = InfluenceResults(scores=torch.ones(2, 50), query_indices=torch.arange(2),
                                 train_indices=torch.arange(50), query_losses=torch.ones(2))
        small.save(path)
        before = open(path, "rb").read()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 4096, resource.RLIM_INFINITY))
        big = InfluenceResults(scores=torch.ones(4, 5000), query_indices=torch.arange(4),
                               train_indices=torch.arange(5000), query_losses=torch.ones(4))
        try:
            big.save(path)
        except ResultsFileError as err:
            print("ERROR", err)
        assert open(path, "rb").read() == before
        assert torch.equal(InfluenceResults.load(path).scores, small.scores)
        assert os.listdir(os.path.dirname(path)) == ["results.pt"]
        print("KEPT")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERROR could not write" in out.stdout and "[Errno 27 EFBIG] File too large" in out.stdout
    assert "the previous results.pt is unchanged" in out.stdout and "KEPT" in out.stdout


# ---------------------------------------------------------------- loading damaged files
def _damage(path, how, results):
    data = bytearray(path.read_bytes())
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "garbage":
        path.write_bytes(b"not a results file\n" * 20)
    elif how == "flipped":
        raw = results.scores.numpy().tobytes()
        at = bytes(data).find(raw[:64])
        assert at > 0
        data[at + 10] ^= 0x40
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, match", [
    ("empty", r"results.pt is empty \(0 bytes\): its write was interrupted or failed"),
    ("truncated", r"results.pt \(\d+ bytes\) cannot be read: it is truncated, corrupted or not a results file"),
    ("garbage", r"results.pt \(\d+ bytes\) cannot be read: it is truncated, corrupted"),
    ("flipped", r"results.pt is corrupted: its contents \(scores, settings, diagnostics or timings\) do not match the checksum"),
])
def test_damaged_file_names_the_file_and_the_problem(tmp_path, results, how, match):
    path = tmp_path / "results.pt"
    results.save(path)
    _damage(path, how, results)
    with pytest.raises(ResultsFileError, match=match):
        InfluenceResults.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ResultsFileError, match=r"nothing.pt does not exist"):
        InfluenceResults.load(tmp_path / "nothing.pt")


@pytest.mark.parametrize("change, match", [
    (dict(query_losses=torch.zeros(5)), r"'query_losses' must have shape \[3\] for 3×120 scores, got shape \(5,\)"),
    (dict(self_influence=torch.zeros(7)), r"'self_influence' must have shape \[120\]"),
    (dict(scores=torch.zeros(3, 120, dtype=torch.long)), r"'scores' must be a 2-D floating tensor"),
    (dict(query_indices=torch.zeros(3)), r"'query_indices' must hold integers"),
    (dict(scores=torch.full((3, 120), float("nan"))), r"'scores' holds 360 NaN/inf values"),
    (dict(query_losses=torch.tensor([1.0, float("inf"), 2.0])), r"'query_losses' holds 1 NaN/inf"),
])
def test_stored_shapes_and_finiteness_are_checked(tmp_path, results, change, match):
    """Files without a checksum (written by hand, or before checksums) are still checked."""
    state = {f: getattr(results, f) for f in ("scores", "query_indices", "train_indices", "query_losses",
                                               "self_influence", "diagnostics", "timings")}
    state["settings"] = dict(results.settings)
    state.update(change, format_version=2)
    torch.save(state, tmp_path / "results.pt")
    with pytest.raises(ResultsFileError, match=match):
        InfluenceResults.load(tmp_path / "results.pt")


# ---------------------------------------------------------------- flipped bytes in the metadata
def _flipped_metadata_loads(tmp_path, results, stride: int):
    """Flip one bit of every ``stride``-th byte of the pickled metadata (``data.pkl``: record, diagnostics,
    timings, the tensors' references) in a re-packed archive with valid zip CRCs (so that the zip layer does not
    catch it first), and load each. Returns ``(refused, harmless, silent)``: refused with a results-file error,
    loaded with content equal to the original, loaded with other content."""
    import io
    import zipfile

    from lightning_influence.errors import InfluenceConfigError

    path = tmp_path / "results.pt"
    results.save(path)
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    k = next(j for j, (name, _) in enumerate(entries) if name.endswith("/data.pkl"))
    pickled = entries[k][1]
    expected = results.to_state()["checksum"]
    refused, harmless, silent = 0, 0, []
    flipped = tmp_path / "flipped.pt"
    for i in range(0, len(pickled), stride):
        data = bytearray(pickled)
        data[i] ^= 1 << (i // stride % 8)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
            for j, (name, content) in enumerate(entries):
                out.writestr(name, bytes(data) if j == k else content)
        flipped.write_bytes(buf.getvalue())
        try:
            loaded = InfluenceResults.load(flipped)
        except (ResultsFileError, InfluenceConfigError) as err:  # the format version itself flipped: refused too
            assert str(flipped) in str(err) and "Recompute" in str(err)
            refused += 1
            continue
        if loaded.to_state()["checksum"] == expected:  # e.g. a pickle memo index nobody reads
            harmless += 1
        else:
            silent.append(i)
    return refused, harmless, silent


def test_a_flipped_byte_in_the_metadata_never_loads_silently(tmp_path, results):
    """Every 4th byte of the pickled metadata (about 570 flips; all of them in the slow test): each is refused,
    or loads the very same content; none gives other results."""
    refused, harmless, silent = _flipped_metadata_loads(tmp_path, results, stride=4)
    assert silent == [] and refused > 10 * harmless


@pytest.mark.slow
def test_every_flipped_byte_in_the_metadata_is_refused_or_harmless(tmp_path, results):
    refused, harmless, silent = _flipped_metadata_loads(tmp_path, results, stride=1)
    assert silent == [] and refused > 10 * harmless
