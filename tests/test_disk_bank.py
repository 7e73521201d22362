"""The disk bank: rows in sparse files, checkpoints that record a version, undo journals that restore one."""

import io

import pytest
import torch

from fedrl_lightning.client_state import ClientState, ClientStateBank
from fedrl_lightning.disk_bank import DiskClientStateBank


def _state(cid: int, value: float) -> ClientState:
    state = ClientState({"position": cid}, torch.tensor([cid % 256], dtype=torch.uint8), extra={"v": value})
    state.optimizer = {"0.m": torch.full((64,), value), "0.step": torch.tensor(value, dtype=torch.float64)}
    state.adapter = {"w": torch.full((8, 8), value, dtype=torch.bfloat16)}
    return state


def _value(bank: ClientStateBank, cid: int) -> float | None:
    state = bank.get(cid)
    if state is None:
        return None
    assert state.extra["v"] == float(state.optimizer["0.m"][0]) == float(state.adapter["w"][0, 0])
    return state.extra["v"]


def _checkpoint(bank: ClientStateBank) -> dict:
    """``bank.state_dict()`` as a checkpoint holds it: written out at once."""
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _reopen(saved, tmp_path, keep=2):
    """A new process resuming: a fresh bank object over the same directory, loading a checkpoint."""
    bank = DiskClientStateBank(range(1000), tmp_path, keep)
    bank.load_state_dict(saved)
    return bank


def test_rows_live_in_sparse_files_and_reads_are_copies(tmp_path):
    bank = DiskClientStateBank(range(1000), tmp_path)
    bank.put(999, _state(999, 1.5))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["adapter-bfloat16.bin", "bank.json", "optimizer-float32.bin", "optimizer-float64.bin"]
    assert (tmp_path / "optimizer-float32.bin").stat().st_size == 1000 * 64 * 4  # every row addressable
    assert bank.nbytes() < 1000 * 64 * 4  # but only the written one takes disk space
    assert _value(bank, 999) == 1.5 and bank.get(0) is None and bank.read("adapter", 0) is None
    got = bank.read("optimizer", 999)
    got["0.m"].fill_(7.0)  # a copy: the stored row is untouched
    assert _value(bank, 999) == 1.5


def test_a_checkpoint_records_the_version_not_the_rows(tmp_path):
    bank = DiskClientStateBank(range(1000), tmp_path)
    for cid in range(10):
        bank.put(cid, _state(cid, float(cid)))
    saved = _checkpoint(bank)
    assert "buffers" not in saved and saved["disk"]["version"] == 1
    torch.save(saved, tmp_path / "ckpt.pt")
    assert (tmp_path / "ckpt.pt").stat().st_size < 20_000  # the 10 clients' rows are not in it


def test_going_back_to_a_checkpoint_replays_the_undo_journals_newest_first(tmp_path):
    bank = DiskClientStateBank(range(1000), tmp_path, keep_versions=3)
    bank.put(0, _state(0, 1.0))
    first = _checkpoint(bank)  # version 1: client 0 at 1.0
    bank.put(0, _state(0, 2.0))
    bank.put(1, _state(1, 2.0))  # new since version 1: not journaled, forgotten by going back
    second = _checkpoint(bank)  # version 2
    bank.put(0, _state(0, 3.0))
    bank.put(1, _state(1, 3.0))
    bank.put(2, _state(2, 3.0))  # like a round cut off by a crash
    # a retried round: only its clients go back, to the last checkpoint
    bank.load_state_dict(second, only=[1, 2])
    assert (_value(bank, 0), _value(bank, 1), _value(bank, 2)) == (3.0, 2.0, None)
    bank.put(1, _state(1, 4.0))  # journaled already in this version: its before-image stays version 2's
    bank.close()
    resumed = _reopen(second, tmp_path, keep=3)  # a new process after a crash
    assert (_value(resumed, 0), _value(resumed, 1), _value(resumed, 2)) == (2.0, 2.0, None)
    resumed.close()
    oldest = _reopen(first, tmp_path, keep=3)  # e.g. the newest checkpoint was torn
    assert (_value(oldest, 0), _value(oldest, 1)) == (1.0, None)
    with pytest.raises(ValueError, match="cannot go back to the checkpoint's version 2"):
        oldest.load_state_dict(second)  # that future was dropped when the bank went back to version 1


def test_journals_older_than_the_kept_checkpoints_are_pruned(tmp_path):
    bank = DiskClientStateBank(range(4), tmp_path, keep_versions=2)
    saved = []
    for version in range(1, 5):
        bank.put(0, _state(0, float(version)))
        saved.append(_checkpoint(bank))
    journals = sorted(p.name for p in tmp_path.glob("undo-*.log"))
    assert journals == ["undo-000004.log", "undo-000005.log"]  # back to version 3 or 4, nothing older
    bank.put(0, _state(0, 9.0))
    bank.load_state_dict(saved[2])
    assert _value(bank, 0) == 3.0
    with pytest.raises(ValueError, match="resume from a newer checkpoint"):
        bank.load_state_dict(saved[0])


def test_a_torn_journal_entry_is_skipped(tmp_path):
    bank = DiskClientStateBank(range(2), tmp_path)
    bank.put(0, _state(0, 1.0))
    saved = _checkpoint(bank)
    bank.put(0, _state(0, 2.0))
    bank.close()
    journal = tmp_path / "undo-000002.log"
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"kind": "optimizer", "row": 1, "dtype": "float32", "nbytes": 256}\n' + b"\0" * 10)
    assert _value(_reopen_small(saved, tmp_path), 0) == 1.0


def _reopen_small(saved, tmp_path):
    bank = DiskClientStateBank(range(2), tmp_path)
    bank.load_state_dict(saved)
    return bank


def test_checkpoints_move_between_ram_and_disk_banks_only_where_they_can(tmp_path):
    ram = ClientStateBank(range(3))
    ram.put(2, _state(2, 5.0))
    disk = DiskClientStateBank(range(3), tmp_path / "a")
    disk.load_state_dict(ram.state_dict())  # a RAM checkpoint's rows are copied in
    assert _value(disk, 2) == 5.0
    with pytest.raises(ValueError, match="trainer.client_state_dir"):
        ClientStateBank(range(3)).load_state_dict(disk.state_dict())
    other = DiskClientStateBank(range(3), tmp_path / "b")
    other.put(0, _state(0, 1.0))
    with pytest.raises(ValueError, match="not the one in"):
        other.load_state_dict(disk.state_dict())
    with pytest.raises(ValueError, match="no client-state bank to resume"):
        DiskClientStateBank(range(3), tmp_path / "empty").load_state_dict(disk.state_dict())


def test_a_new_run_over_an_old_bank_says_it_starts_it_over(tmp_path, caplog):
    old = DiskClientStateBank(range(2), tmp_path)
    old.put(0, _state(0, 1.0))
    old.close()
    new = DiskClientStateBank(range(2), tmp_path)
    new.put(1, _state(1, 2.0))
    assert "held a client-state bank already" in caplog.text
    assert new.get(0) is None and _value(new, 1) == 2.0
