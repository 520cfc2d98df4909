import json

import pytest

from lib.errors import CheckpointError
from lib.train import checkpoint as ck


def make(ckpt_dir, step, val_loss=None, payload=b"weights"):
    tmp = ck.begin(ckpt_dir, step)
    (tmp / "model.safetensors").write_bytes(payload)
    return ck.commit(tmp, {"step": step, "val_loss": val_loss})


def test_commit_is_atomic_and_manifested(tmp_path):
    final = make(tmp_path, 5, 0.3)
    assert final.name == "step-0000005" and not list(tmp_path.glob(".tmp-*"))
    state = json.loads((final / ck.STATE_FILE).read_text())
    import hashlib
    assert state["files"] == {"model.safetensors": {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}}
    assert state["step"] == 5
    assert ck.check_complete(final) is None


def test_incomplete_folders_are_skipped_with_a_warning(tmp_path):
    make(tmp_path, 3, 0.5)
    bad = make(tmp_path, 6, 0.4)
    (bad / "model.safetensors").write_bytes(b"trunc")            # size differs from manifest
    (tmp_path / "step-0000009").mkdir()                          # no state file at all
    warnings = []
    infos = ck.list_checkpoints(tmp_path, warnings.append)
    assert [c.step for c in infos] == [3]
    assert any("step-0000006" in w and "expected 7" in w for w in warnings)
    assert any("step-0000009" in w and "did not finish" in w for w in warnings)
    assert ck.resolve("latest", tmp_path, warnings.append).step == 3


def test_rotation_keeps_last_best_and_marked(tmp_path):
    for step, loss in [(1, 0.9), (2, 0.1), (3, 0.5), (4, 0.6), (5, 0.7), (6, 0.8)]:
        make(tmp_path, step, loss)
    (tmp_path / "step-0000003" / ck.KEEP_FILE).write_text("kept")
    removed = ck.rotate(tmp_path, keep_last=2)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["step-0000002", "step-0000003", "step-0000005", "step-0000006"]
    assert sorted(p.name for p in removed) == ["step-0000001", "step-0000004"]
    assert ck.resolve("best", tmp_path).step == 2


def test_rotation_never_deletes_the_only_complete_checkpoint(tmp_path):
    make(tmp_path, 1, 0.2)
    broken = make(tmp_path, 2, 0.1)
    (broken / ck.STATE_FILE).unlink()
    ck.rotate(tmp_path, keep_last=1)
    assert (tmp_path / "step-0000001").is_dir() and (tmp_path / "step-0000002").is_dir()


def test_rewriting_a_step_moves_the_old_one_aside(tmp_path):
    make(tmp_path, 4, payload=b"old")
    make(tmp_path, 4, payload=b"new")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "step-0000004" and names[1].startswith("step-0000004.replaced-")
    assert (tmp_path / names[1] / "model.safetensors").read_bytes() == b"old"


def test_resolve_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="--resume latest: no complete checkpoint under"):
        ck.resolve("latest", tmp_path)
    with pytest.raises(CheckpointError, match="--resume .*nope: no such checkpoint folder"):
        ck.resolve(str(tmp_path / "nope"), tmp_path)
    make(tmp_path, 2)
    with pytest.raises(CheckpointError, match="no checkpoint under .* has a validation result"):
        ck.resolve("best", tmp_path)
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ck.resolve(str(tmp_path / "half"), tmp_path)


def test_clean_temporaries(tmp_path):
    ck.begin(tmp_path, 7)
    assert [p.name for p in ck.clean_temporaries(tmp_path)] == [".tmp-step-0000007"]
    assert not list(tmp_path.iterdir())


def test_best_stage1_checkpoint_is_chosen_after_disc_start(tmp_path):
    """prior.vae_checkpoint best: the pixel loss favours checkpoints from before the GAN term,
    so once a run went past disc_start only the checkpoints after it are candidates."""
    from lib.train.weights import resolve_trained
    ckpt_dir = tmp_path / "vae" / "checkpoints"

    def vae_ckpt(step, val_loss, disc_start=20):
        tmp = ck.begin(ckpt_dir, step)
        (tmp / "vae").mkdir()
        (tmp / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"w")
        (tmp / "config.yaml").write_text(f"vae:\n  loss:\n    disc_start: {disc_start}\n    disc_weight: 0.5\n")
        return ck.commit(tmp, {"step": step, "val_loss": val_loss})

    for step, loss in ((10, 0.10), (20, 0.05), (30, 0.30), (40, 0.20)):
        vae_ckpt(step, loss)
    assert resolve_trained("vae", "best", tmp_path, option="prior.vae_checkpoint").step == 40
    assert resolve_trained("vae", "latest", tmp_path).step == 40
    assert ck.best_of(ck.list_checkpoints(ckpt_dir)).step == 20          # what best meant before
    ckpt_dir2 = tmp_path / "early" / "vae" / "checkpoints"
    ckpt_dir = ckpt_dir2
    for step, loss in ((10, 0.10), (20, 0.05)):                          # not past disc_start yet
        vae_ckpt(step, loss)
    assert resolve_trained("vae", "best", tmp_path / "early").step == 20


def test_contents_changed_in_place_are_found_by_the_manifest(tmp_path):
    """A weight file damaged without changing its size, still a valid safetensors file: only the
    SHA-256 of the manifest can tell, and resolving latest skips it with a warning naming why."""
    import torch
    from safetensors.torch import load_file, save_file
    for step in (3, 6):
        tmp = ck.begin(tmp_path, step)
        save_file({"w": torch.arange(16, dtype=torch.float32)}, str(tmp / "model.safetensors"))
        ck.commit(tmp, {"step": step})
    victim = tmp_path / "step-0000006" / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"                          # the last weight becomes +inf
    victim.write_bytes(bytes(data))
    assert torch.isinf(load_file(str(victim))["w"][-1])          # safetensors reads it without complaint
    assert ck.check_complete(victim.parent) is None               # sizes alone do not show it ...
    assert "is damaged (its SHA-256 differs" in ck.check_complete(victim.parent, verify=True)   # ... the digest does
    warnings = []
    chosen = ck.resolve("latest", tmp_path, warnings.append)
    assert chosen.step == 3
    assert len(warnings) == 1 and "step-0000006" in warnings[0] and "model.safetensors is damaged" in warnings[0]


def test_a_rotation_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Deleting a checkpoint renames it to a hidden name first: killed in the middle of the
    deletion, the rotation leaves no step-N folder with files missing (which every later listing
    would warn about) but a leftover the next start removes."""
    for step in (1, 2, 3):
        make(tmp_path, step)

    def killed(path, *a, **k):                    # deletes one file, then the process dies
        next(p for p in sorted(path.rglob("*")) if p.is_file()).unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(ck.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.rotate(tmp_path, keep_last=2)
    monkeypatch.undo()
    warnings = []
    assert [c.step for c in ck.list_checkpoints(tmp_path, warnings.append)] == [2, 3] and warnings == []
    assert [p.name for p in ck.clean_temporaries(tmp_path)] == [".deleting-step-0000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002", "step-0000003"]


def test_an_edited_trainer_state_is_found_like_a_damaged_file(tmp_path):
    """The manifest covers every file, the trainer state too: it records the SHA-256 of the rest
    of itself (a latent scale changed x10 by hand was once taken as it was)."""
    make(tmp_path, 3)
    edited = make(tmp_path, 6)
    state = json.loads((edited / ck.STATE_FILE).read_text())
    assert state["state_sha256"] == ck.state_digest(state)
    state["latent_scale"] = 10.0
    (edited / ck.STATE_FILE).write_text(json.dumps(state, indent=1))
    assert "trainer_state.json was changed after it was written" in ck.check_complete(edited, verify=True)
    warnings = []
    assert ck.resolve("latest", tmp_path, warnings.append).step == 3
    assert "step-0000006" in warnings[0] and "was changed after it was written" in warnings[0]
    with pytest.raises(CheckpointError, match="not a complete checkpoint: trainer_state.json was changed"):
        ck.resolve(str(edited), tmp_path)
