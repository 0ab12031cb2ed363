"""`mnemo data text|images`: every input byte accounted for, shards readable by `tar` and by
plain webdataset (no Mnemosyne code), atomic output, uint32 for large vocabularies."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from data.convert import main
from data.convert.text import convert_text, parse_size, staged_output

BINARY = b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)) * 4


def _tree(root: Path) -> tuple[Path, list[bytes]]:
    """A directory of mixed inputs; returns it and the documents in the order written."""
    d = root / "in"
    (d / "b" / "c").mkdir(parents=True)
    (d / ".git").mkdir()
    docs_by_path = {
        "a.txt": b"plain ascii\n" * 30,
        "b/c/utf8.md": "héllo wörld — ünïcode ✓\n".encode() * 7,
        "b/latin1.txt": "caf\xe9 cr\xe8me\n".encode("latin-1"),
    }
    for rel, text in docs_by_path.items():
        (d / rel).write_bytes(text)
    gz_text = b"compressed text " * 100
    (d / "b" / "z.txt.gz").write_bytes(gzip.compress(gz_text))
    lines = [{"text": f"line {i} ✓", "id": i} for i in range(5)]
    (d / "b" / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    (d / "b" / "prog.bin").write_bytes(BINARY)
    (d / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")
    # Sorted walk: a.txt, b/c/utf8.md, b/d.jsonl, b/latin1.txt, b/prog.bin (skipped), b/z.txt.gz
    docs = [
        docs_by_path["a.txt"],
        docs_by_path["b/c/utf8.md"],
        *[x["text"].encode() for x in lines],
        docs_by_path["b/latin1.txt"],
        gz_text,
    ]
    return d, docs


def _wds_tokens(out: Path) -> list[tuple[str, np.ndarray]]:
    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False).decode()
    return [(s["__key__"], s["tokens.npy"]) for s in ds]


def test_text_accounts_for_every_byte_and_reads_with_plain_webdataset(tmp_path: Path) -> None:
    src, docs = _tree(tmp_path)
    extra = tmp_path / "extra.txt"
    extra.write_bytes(b"one more file\n")
    docs.append(extra.read_bytes())
    meta = convert_text([str(src), str(extra)], tmp_path / "out", shard_size="2KB", progress=False)
    s, t = meta["inputs"], meta["totals"]
    on_disk = sum(p.stat().st_size for p in [*src.rglob("*"), extra] if p.is_file())
    assert s["disk_bytes"] + s["skipped_binary_bytes"] + s["skipped_hidden_bytes"] == on_disk
    assert (s["skipped_binary"], s["skipped_hidden"]) == (1, 1)
    assert t["tokens"] == s["text_bytes"] == sum(len(d) for d in docs)
    assert t["samples"] == len(docs) and t["shards"] > 1 and meta["dtype"] == "uint16"
    got = _wds_tokens(tmp_path / "out")
    assert [k for k, _ in got] == [f"{i:010d}" for i in range(len(docs))]
    for (key, arr), want in zip(got, docs):
        assert arr.dtype == np.uint16 and arr.tobytes()[::2] == want, key
    on_index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert sum(x["samples"] for x in on_index["shards"]) == len(docs)


def test_shards_are_plain_tar(tmp_path: Path) -> None:
    src, docs = _tree(tmp_path)
    convert_text([str(src)], tmp_path / "out", shard_size="2KB", progress=False)
    names = []
    for shard in sorted((tmp_path / "out").glob("shard-*.tar")):
        names += subprocess.run(
            ["tar", "-tf", str(shard)], check=True, capture_output=True, text=True
        ).stdout.split()
    assert names == [f"{i:010d}.tokens.npy" for i in range(len(docs))]
    first = subprocess.run(
        ["tar", "-xOf", str(tmp_path / "out" / "shard-000000.tar"), names[0]],
        check=True,
        capture_output=True,
    ).stdout
    arr = np.load(io.BytesIO(first), allow_pickle=False)
    assert bytes(arr.astype(np.uint8)) == docs[0]


def test_shard_size_is_respected(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        (src / f"{i:03d}.txt").write_bytes(b"x" * (50 + 37 * i))
    (src / "huge.txt").write_bytes(b"y" * 20_000)  # larger than a shard: a shard of its own
    meta = convert_text([str(src)], tmp_path / "out", shard_size="4KB", progress=False)
    for rec in meta["shards"]:
        size = (tmp_path / "out" / rec["name"]).stat().st_size
        assert size == rec["bytes"]
        assert size <= 4000 or rec["samples"] == 1, rec


def test_failure_leaves_no_index_and_no_temp_files(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_bytes(b"fine " * 1000)
    (src / "b.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: no field 'text' \(has \['body'\]\)"):
        convert_text([str(src)], tmp_path / "out", shard_size="4KB", progress=False)
    # Written beside --out and swapped in only when complete: no folder, no staging left.
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("cmd", ["text", "images"])
def test_failed_replacement_keeps_the_earlier_dataset(tmp_path: Path, capsys, cmd: str) -> None:
    """--force over our own output, then a conversion that fails half-way (text: a jsonl line
    without the field; images: no images at all): the earlier dataset is still there, intact."""
    src, _ = _tree(tmp_path)
    bad = tmp_path / "bad"
    if cmd == "images":
        src = tmp_path / "img"
        _img(src / "cat" / "0.png", (4, 4), "PNG", 0)
        (bad / "cat").mkdir(parents=True)
        (bad / "cat" / "notes.txt").write_text("not an image")
    else:
        bad.mkdir()
        (bad / "a.txt").write_bytes(b"fine " * 1000)
        (bad / "b.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    out = tmp_path / "out"
    assert main([cmd, "--input", str(src), "--out", str(out), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    capsys.readouterr()
    assert main([cmd, "--input", str(bad), "--out", str(out), "--no-progress", "--force"]) == 2
    assert str(bad) in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_cli_summary_progress_force_and_errors(tmp_path: Path, capsys) -> None:
    src, docs = _tree(tmp_path)
    out = str(tmp_path / "out")
    assert main(["text", "--input", str(src), "--out", out]) == 0
    cap = capsys.readouterr()
    assert f"wrote {len(docs)} documents" in cap.out and "skipped 1 binary file(s)" in cap.out
    assert "reading" in cap.err  # the progress bar
    assert main(["text", "--input", str(src), "--out", out]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["text", "--input", str(src), "--out", out, "--force", "--no-progress"]) == 0
    assert main(["text", "--input", str(tmp_path / "missing"), "--out", out, "--force"]) == 2
    assert "missing' is neither a file nor a directory" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "text" in capsys.readouterr().out
    assert main(["text", "--input", str(src), "--out", out, "--force", "--shard-size", "lots"]) == 2
    assert "expected a size like 256MB" in capsys.readouterr().err


def test_large_vocabulary_writes_uint32(tmp_path: Path) -> None:
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "</s>": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("w5 w69999 w12 nope")
    meta = convert_text(
        [str(tmp_path / "a.txt")],
        tmp_path / "out",
        progress=False,
        tokenizer=str(tmp_path / "tokenizer.json"),
    )
    assert (meta["dtype"], meta["vocab_size"], meta["sep_id"]) == ("uint32", 70_002, 70_001)
    [(_, arr)] = _wds_tokens(tmp_path / "out")
    assert arr.dtype == np.uint32 and arr.tolist() == [5, 69_999, 12, 70_000]


def test_parse_size() -> None:
    assert parse_size("256MB") == 256_000_000 and parse_size("64MiB") == 64 << 20
    assert parse_size("1000") == 1000 and parse_size("2k") == 2000
    with pytest.raises(ValueError, match="12 parsecs"):
        parse_size("12 parsecs")


# ---------------------------------------------------------------------------------------------
# Images


def _img(path: Path, size: tuple[int, int], fmt: str, color: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (color, 0, 255 - color)).save(path, format=fmt)


def test_image_classes(tmp_path: Path) -> None:
    src = tmp_path / "in"
    for c, name in enumerate(["cat", "dog", "emu"]):
        for i in range(4):
            fmt = "PNG" if i % 2 else "JPEG"
            _img(src / name / f"{i}.{fmt.lower()}", (8 + c, 6), fmt, 40 * c)
    (src / "dog" / "README.txt").write_text("not an image")
    assert (
        main(
            [
                "images",
                "--input",
                str(src),
                "--out",
                str(tmp_path / "out"),
                "--shard-size",
                "4KB",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "out" / "index.json").read_text())
    assert meta["kind"] == "image_classes" and meta["classes"] == ["cat", "dog", "emu"]
    assert meta["class_counts"] == [4, 4, 4] and meta["inputs"]["skipped_non_image"] == 1
    urls = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    assert len(urls) > 1
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 12
    for s in samples:
        img = s.get("png") or s.get("jpg")
        assert img.size == (8 + s["cls"], 6)
    assert {s["cls"] for s in samples[:6]} != {samples[0]["cls"]}, "classes are not mixed"


def test_image_pairs(tmp_path: Path) -> None:
    src = tmp_path / "in"
    for i in range(3):
        _img(src / "DIV2K_LR_x2" / f"{i:04d}x2.png", (4, 4), "PNG", 10 * i)
        _img(src / "DIV2K_HR" / f"{i:04d}.png", (8, 8), "PNG", 10 * i)
    _img(src / "DIV2K_HR" / "0099.png", (8, 8), "PNG", 0)  # no LR partner
    assert (
        main(["images", "--input", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    )
    meta = json.loads((tmp_path / "out" / "index.json").read_text())
    assert meta["kind"] == "image_pairs" and meta["pairs"] == 3
    assert meta["inputs"]["unmatched_hr"] == 1
    samples = list(
        wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False).decode("pil")
    )
    assert [(s["lr.png"].size, s["hr.png"].size) for s in samples] == [((4, 4), (8, 8))] * 3


# ---------------------------------------------------------------------------------------------
# Inputs and --out that cannot make a dataset: refused, naming the path and what was expected


@pytest.mark.parametrize("what", ["empty", "binary", "blank_jsonl"])
def test_text_without_documents_is_an_error(tmp_path: Path, capsys, what: str) -> None:
    src = tmp_path / "in"
    src.mkdir()
    if what == "binary":
        (src / "prog.bin").write_bytes(BINARY)
    elif what == "blank_jsonl":  # only discovered while reading: no index may be left behind
        (src / "a.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    out = tmp_path / "out"
    assert main(["text", "--input", str(src), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and "no text documents" in err and "expected" in err, err
    assert not (out / "index.json").exists() and not list(out.glob("shard-*")), "output left"


def test_images_without_images_is_an_error(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in" / "cat"
    src.mkdir(parents=True)
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    argv = ["images", "--input", str(tmp_path / "in"), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "in") in err and "no images" in err, err
    assert not (out / "index.json").exists()


@pytest.mark.parametrize("cmd", ["text", "images"])
def test_out_with_unrelated_files_is_refused(tmp_path: Path, capsys, cmd: str) -> None:
    src, _ = _tree(tmp_path)
    if cmd == "images":
        src = tmp_path / "img"
        _img(src / "cat" / "0.png", (4, 4), "PNG", 0)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "photos").mkdir()
    for extra in ([], ["--force"]):  # --force replaces only our own output
        assert main([cmd, "--input", str(src), "--out", str(out), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert str(out) in err and "notes.txt" in err and "photos" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "photos"]
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("cmd", ["text", "images"])
def test_out_replacing_our_own_output_says_so(tmp_path: Path, capsys, cmd: str) -> None:
    src, _ = _tree(tmp_path)
    if cmd == "images":
        src = tmp_path / "img"
        _img(src / "cat" / "0.png", (4, 4), "PNG", 0)
    out = str(tmp_path / "out")
    argv = [cmd, "--input", str(src), "--out", out, "--no-progress"]
    assert main(argv) == 0
    assert "replacing" not in capsys.readouterr().err
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    err = capsys.readouterr().err
    assert f"replacing the earlier output in {out}" in err, err


@pytest.mark.parametrize("cmd", ["text", "images"])
def test_out_that_is_a_file_is_named(tmp_path: Path, capsys, cmd: str) -> None:
    src, _ = _tree(tmp_path)
    target = tmp_path / "a_file"
    target.write_text("x")
    for out in (target, target / "sub"):
        argv = [cmd, "--input", str(src), "--out", str(out), "--no-progress"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(target) in err and "is a file" in err and "Errno" not in err, err
    assert target.read_text() == "x"


@pytest.mark.parametrize("cmd", ["text", "images"])
def test_shard_size_help_names_decimal_and_binary_units(capsys, cmd: str) -> None:
    assert main([cmd, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "MB = 10^6 bytes" in text and "MiB = 2^20 bytes" in text, text


def test_staging_folder_is_removed_when_the_swap_is_refused(tmp_path: Path) -> None:
    """--out gained a foreign file while we converted: the swap is refused (naming it) and the
    staged dataset does not linger beside --out."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="notes.txt"):
        with staged_output(out, force=False) as stage:
            (stage / "index.json").write_text("{}")
            out.mkdir()
            (out / "notes.txt").write_text("someone else's")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
