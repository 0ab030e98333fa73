import lightning.pytorch as L
import pytest
import torch

from lightning_mp.data import ByteTextDataModule, ByteWindows


@pytest.fixture(scope="module")
def stdlib():
    dm = ByteTextDataModule(seq_len=128, batch_size=8)
    dm.setup()
    return dm


def test_default_corpus_is_the_stdlib_split_by_file(stdlib):
    assert stdlib.train_data.numel() > 1_000_000 and stdlib.val_data.numel() > 50_000
    assert stdlib.val_files and not set(stdlib.train_files) & set(stdlib.val_files)  # no file in both
    again = ByteTextDataModule(seq_len=128, batch_size=8)
    again.setup()
    assert again.train_files == stdlib.train_files and again.val_files == stdlib.val_files
    assert torch.equal(again.val_data, stdlib.val_data)
    assert 4.0 < stdlib.unigram_bits_per_byte() < 6.0


def test_windows_are_next_byte_pairs():
    data = torch.arange(11, dtype=torch.uint8)
    ds = ByteWindows(data, seq_len=4)
    assert len(ds) == 2
    x, y = ds[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8] and x.dtype == torch.long


def test_user_directory_skips_binary_files(tmp_path):
    for i in range(30):
        (tmp_path / f"doc{i}.md").write_text("hello world " * 50)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01" * 100)
    dm = ByteTextDataModule(tmp_path, seq_len=32, batch_size=2, val_fraction=0.2)
    dm.setup()
    assert "blob.bin" not in dm.train_files + dm.val_files
    assert len(dm.train_files) + len(dm.val_files) == 30
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_single_file_holds_out_its_tail(tmp_path):
    f = tmp_path / "book.txt"
    f.write_bytes(bytes(range(32, 127)) * 20)
    dm = ByteTextDataModule(f, seq_len=16, val_fraction=0.1)
    dm.setup()
    assert dm.train_data.numel() + dm.val_data.numel() == 95 * 20
    assert torch.equal(torch.cat([dm.train_data, dm.val_data]), torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8))


def test_glob_selects_files_and_a_single_match_holds_out_its_tail(tmp_path):
    for i in range(30):
        (tmp_path / f"doc{i}.md").write_text("hello world " * 50)
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / f"code{i}.py").write_text("x = 1\n" * 50)
    docs = ByteTextDataModule(tmp_path, glob="*.md", seq_len=16, val_fraction=0.2)
    docs.setup()
    assert sorted(docs.train_files + docs.val_files) == sorted(f"doc{i}.md" for i in range(30))
    code = ByteTextDataModule(tmp_path, glob="**/*.py", seq_len=16, val_fraction=0.2)
    code.setup()
    assert len(code.train_files + code.val_files) == 30 and all(f.startswith("sub/") for f in code.train_files)
    one = ByteTextDataModule(tmp_path, glob="sub/code7.py", seq_len=16, val_fraction=0.1)
    one.setup()
    assert one.train_data.numel() == 270 and one.val_data.numel() == 30  # 300 bytes: the last 10 % held out
    # The stdlib with a pattern: the Python documentation's prose, one file of the default corpus.
    topics = ByteTextDataModule(glob="pydoc_data/topics.py", seq_len=16)
    topics.setup()
    assert topics.train_files == ["topics.py"] and topics.val_data.numel() > 10_000


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ByteTextDataModule(tmp_path / "nope").setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no non-empty text files"):
        ByteTextDataModule(empty).setup()
    with pytest.raises(ValueError, match="no non-empty text files matching glob='\\*.rst'"):
        ByteTextDataModule(empty, glob="*.rst").setup()
    (tmp_path / "a.txt").write_text("abc" * 100)
    with pytest.raises(ValueError, match="path .* is a file"):
        ByteTextDataModule(tmp_path / "a.txt", glob="*.txt").setup()
    (empty / "x.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="no non-empty text files"):
        ByteTextDataModule(empty).setup()
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="seq_len=64 is longer"):
        ByteTextDataModule(short, seq_len=64).setup()
    with pytest.raises(ValueError, match="val_fraction"):
        ByteTextDataModule(val_fraction=1.5)


class _Recorder(L.LightningModule):
    """Records the first byte of every training sequence it steps on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0][:, 0].tolist())
        return (self.w - 1.0) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(text, steps, ckpt_path=None, save=None):
    L.seed_everything(3, verbose=False)
    model = _Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, ByteTextDataModule(text, seq_len=8, batch_size=4), ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model.seen


@pytest.mark.parametrize("first", [3, 5, 8])  # mid-pass, just past the first pass (4 batches a pass), at its end
def test_stopping_and_resuming_sees_the_batches_of_one_run(first, tmp_path):
    text = tmp_path / "book.txt"
    text.write_bytes(bytes(range(32, 127)) * 2)  # 180 training bytes: 22 windows, 5 full batches of 4 a pass
    straight = _fit(text, 12)
    assert len(straight) == 12 and straight[:5] != straight[5:10]  # each pass reshuffles
    head = _fit(text, first, save=tmp_path / "stop.ckpt")
    tail = _fit(text, 12, ckpt_path=tmp_path / "stop.ckpt")
    assert head + tail == straight


def test_every_window_once_per_pass(tmp_path):
    text = tmp_path / "book.txt"
    text.write_bytes(bytes(range(32, 127)) * 2)
    seen = _fit(text, 10)
    firsts = sorted(b for batch in seen[:5] for b in batch)
    assert len(set(firsts)) == 20 and firsts == sorted(set(firsts))  # 5 batches of 4 distinct windows


def test_a_binary_file_as_path_is_refused(tmp_path):
    blob = tmp_path / "model.bin"
    blob.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(ValueError, match="is a binary file"):
        ByteTextDataModule(blob).setup()


def test_files_too_few_to_split_by_name_hold_out_the_tail(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt"):  # at val_fraction=0.05 no name hashes into validation
        (tmp_path / name).write_text(name * 200)
    dm = ByteTextDataModule(tmp_path, seq_len=8, val_fraction=0.05)
    dm.setup()
    whole = b"".join((tmp_path / n).read_bytes() for n in ("a.txt", "b.txt", "c.txt"))
    assert bytes(dm.train_data.tolist()) + bytes(dm.val_data.tolist()) == whole
    assert dm.val_data.numel() == len(whole) - int(len(whole) * 0.95)


def test_ddp_ranks_share_each_pass_without_overlap():
    from lightning_mp.data import EpochOrder

    ranks = [list(EpochOrder(23, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 11
    assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == 22
    assert list(EpochOrder(23, seed=5)) != sorted(range(23))  # shuffled
