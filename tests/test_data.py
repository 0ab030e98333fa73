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
