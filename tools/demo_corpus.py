#!/usr/bin/env python3
"""demo_corpus.py: build the training corpus of the demo model from apt's package lists.

Role
    Every Debian machine carries the same text: the package descriptions in apt's lists.
    This script turns them into one compressed file that travels to the training machine
    (which has neither internet nor apt lists):

        .corpus/apt-descriptions.jsonl.gz     (git-ignored)

    Each document is one package, in the format people know from `apt-cache show`:

        Package: 0ad
        Description: Real-time strategy game of ancient warfare
         0 A.D. (pronounced "zero ey-dee") is a free, open-source, cross-platform
         ...

Sources
    `apt-cache dumpavail` gives one record per package (name, Source, short description,
    Description-md5). Since apt 1.x the long descriptions live in separate Translation-en
    files, joined by Description-md5; Docker images of Debian skip them
    (Acquire::Languages "none"). When the system lists lack them, the script fetches the lists
    once more with translations into a private folder (.corpus/apt-lists, `apt-get update
    -o Dir::State::Lists=...`), so the system's own lists are never touched. Without
    network it falls back to short descriptions and says so.

Invariants of the output (train_demo.py and eval_demo.py rely on them)
    - gzip'd JSON lines. Line 1 is a header {"corpus": "apt-descriptions", ...}; every other
      line is {"package", "source", "split", "text"} with split "train" or "heldout".
    - One document per package name (dumpavail already keeps one version per name).
    - Split by a hash of the *source* package name (md5, 3% held out by default), so the
      binary packages of one source, which share long descriptions, never straddle the
      split: held-out text is really unseen. 3% is ~235k tokens of the demo tokenizer: the
      200k that eval_demo.py scores, and a tail that train_demo.py watches while training.
    - Document order is a shuffle with a fixed seed of the name-sorted list, so the same
      apt lists and seed give a byte-identical file.
"""

import argparse
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import time

HELPER = "/usr/lib/apt/apt-helper"


def apt_opts(lists_dir):
    """apt -o options that point apt at a private lists folder (None: the system's)."""
    if lists_dir is None:
        return []
    return ["-o", "Dir::State::Lists=" + lists_dir,
            "-o", "Acquire::Languages=en",
            # A private lists folder needs its own package cache, or apt would reuse the
            # system cache built from the other lists.
            "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache="]


def run(cmd):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(cmd), r.returncode,
                                                  r.stderr.decode(errors="replace").strip()))
    return r.stdout.decode("utf-8", errors="replace")


def parse_stanzas(text):
    """Debian control format -> list of dicts; continuation lines keep their leading space."""
    out = []
    for block in text.split("\n\n"):
        rec, key = {}, None
        for line in block.split("\n"):
            if not line:
                continue
            if line[0] in " \t":
                if key is not None:
                    rec[key] += "\n" + line
                continue
            key, _, val = line.partition(":")
            rec[key] = val.strip()
        if "Package" in rec:
            out.append(rec)
    return out


def translation_files(lists_dir):
    out = run(["apt-get"] + apt_opts(lists_dir) +
              ["indextargets", "--format", "$(FILENAME)", "Created-By: Translations"])
    return [f for f in out.split("\n") if f and os.path.exists(f)]


def load_long_descriptions(files):
    """Description-md5 -> full description (short line + long lines), from Translation-en."""
    by_md5 = {}
    for f in files:
        for rec in parse_stanzas(run([HELPER, "cat-file", f])):
            md5, desc = rec.get("Description-md5"), rec.get("Description-en")
            if md5 and desc:
                by_md5[md5] = desc
    return by_md5


def fetch_translations(lists_dir):
    """apt-get update into a private lists folder, with the English translations."""
    os.makedirs(os.path.join(lists_dir, "partial"), exist_ok=True)
    print("fetching package lists with Translation-en into %s ..." % lists_dir, file=sys.stderr)
    r = subprocess.run(["apt-get"] + apt_opts(lists_dir) + ["-q", "update"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        print("warning: apt-get update failed: %s" % r.stderr.decode(errors="replace").strip(),
              file=sys.stderr)
        return False
    return True


def heldout(source, percent):
    h = int.from_bytes(hashlib.md5(source.encode()).digest()[:8], "little")
    return h % 10000 < percent * 100


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".corpus/apt-descriptions.jsonl.gz")
    ap.add_argument("--lists", default=".corpus/apt-lists",
                    help="private apt lists folder used when the system lists lack Translation-en")
    ap.add_argument("--no-fetch", action="store_true",
                    help="never run apt-get update; use what the system lists hold")
    ap.add_argument("--heldout-percent", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    # Where to read from: the system lists if they carry translations, else a private copy.
    lists_dir = None
    tr = translation_files(None)
    if not tr and not args.no_fetch:
        priv = os.path.abspath(args.lists)
        if translation_files(priv) or fetch_translations(priv):
            lists_dir = priv
            tr = translation_files(priv)
    dump = run(["apt-cache"] + apt_opts(lists_dir) + ["dumpavail"])
    pkgs = parse_stanzas(dump)
    if not pkgs:
        sys.exit("error: `apt-cache dumpavail` is empty: run `apt-get update` first")
    long_desc = load_long_descriptions(tr)
    if not long_desc:
        print("warning: no Translation-en lists: the corpus has short descriptions only",
              file=sys.stderr)

    docs, n_long, seen = [], 0, set()
    for p in sorted(pkgs, key=lambda r: r["Package"]):
        name = p["Package"]
        if name in seen:
            continue
        desc = p.get("Description", "")
        if "\n" not in desc:  # short line only: join the long text from Translation-en
            full = long_desc.get(p.get("Description-md5", ""))
            if full:
                desc, n_long = full, n_long + 1
        else:
            n_long += 1
        if not desc:
            continue
        seen.add(name)
        source = p.get("Source", name).split(" ")[0]
        text = "Package: %s\nDescription: %s\n" % (name, desc)
        docs.append({"package": name, "source": source,
                     "split": "heldout" if heldout(source, args.heldout_percent) else "train",
                     "text": text})
    random.Random(args.seed).shuffle(docs)

    n_held = sum(d["split"] == "heldout" for d in docs)
    header = {"corpus": "apt-descriptions", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "lists": lists_dir or "/var/lib/apt/lists", "seed": args.seed,
              "heldout_percent": args.heldout_percent, "documents": len(docs),
              "train": len(docs) - n_held, "heldout": n_held, "with_long_description": n_long,
              "bytes": sum(len(d["text"].encode()) for d in docs)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    # mtime=0: the same input gives the same bytes.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        f.write((json.dumps(header) + "\n").encode())
        for d in docs:
            f.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    os.replace(tmp, args.out)
    header["file_bytes"] = os.path.getsize(args.out)
    print(json.dumps(header, indent=1))


if __name__ == "__main__":
    main()
