"""Deterministic synthetic repositories for bench.py, seeded with
`random.Random(seed)`: the same arguments give byte-identical trees.

- ml-repo: source files of 1-50 KiB (two thirds compressible text, one
  third random bytes) in nested directories, committed to git on `main`; a
  branch `other` differing in `branch_files` files (rewritten, added and
  deleted); a few big random binaries under `data/` (untracked, not
  ignored: synced like any file); a `.venv/` of many small files that the
  repository's .gitignore ignores.
- monorepo: many small text files, no history.
- a single big random file.

Python 3.11 standard library only.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from common import KIB, MIB, git_init, run_cmd  # bench/common.py

GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "core.compression=0",
       "-c", "core.looseCompression=0", "-c", "gc.auto=0"]
GIT_TIMEOUT_S = 1800.0
BRANCH = "other"
GITIGNORE = ".venv/\noutputs/\n"


@dataclass
class MlRepo:
    path: Path
    sources: list[str]  # tracked files under src/, on main
    binaries: list[str]  # untracked big files under data/
    # Files that differ between main and `other`, and the bytes of the
    # versions each checkout writes ("main->other", "other->main").
    branch_paths: list[str] = field(default_factory=list)
    changed_bytes: dict[str, int] = field(default_factory=dict)
    bytes_synced: int = 0  # what a mirror of main holds

    # Top-level entries no mirror has: git's, bridge's, and the ignored .venv.
    SKIP_TOP = frozenset({".git", ".bridge", ".venv", "outputs"})


def text_pool(rng: random.Random) -> bytes:
    """~2.4 MB of word salad to cut text files from."""
    alphabet = "abcdefghijklmnopqrstuvwxyz_"
    vocab = ["".join(rng.choices(alphabet, k=rng.randint(2, 10))) for _ in range(2000)]
    vocab += ["def", "return", "self", "if", "else", "for", "in", "import", "(", ")", ":", "=", "\n", "    "]
    return " ".join(rng.choices(vocab, k=400_000)).encode()


def file_content(rng: random.Random, pool: bytes, size: int, tag: str) -> bytes:
    """Two thirds text cut from the pool, one third random bytes."""
    if rng.random() < 2 / 3:
        head = f"# {tag}\n".encode()
        off = rng.randrange(0, len(pool) - size)
        return head + pool[off:off + size - len(head)]
    return rng.randbytes(size)


def leaf_dirs(n_dirs: int, top: str) -> list[str]:
    """n_dirs directories two levels deep under top (~sqrt(n) per level)."""
    per = max(1, math.ceil(math.sqrt(n_dirs)))
    return [f"{top}/p{i // per:03d}/m{i % per:03d}" for i in range(n_dirs)]


def write_random_file(path: Path, size: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(4 * MIB, left)
            f.write(rng.randbytes(n))
            left -= n


def write_files(root: Path, dirs: list[str], n: int, sizes: tuple[int, int], rng: random.Random,
                pool: bytes, tag: str) -> list[str]:
    """n files spread over dirs; returns their relative paths."""
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    rels = []
    for j in range(n):
        rel = f"{dirs[j % len(dirs)]}/f{j:06d}.py"
        (root / rel).write_bytes(file_content(rng, pool, rng.randint(*sizes), f"{tag} {j}"))
        rels.append(rel)
    return rels


def write_ml_repo(path: Path, files: int, dirs: int, bin_mib: list[int], venv_files: int,
                  branch_files: int, seed: int) -> MlRepo:
    rng = random.Random(seed)
    pool = text_pool(rng)
    run_cmd(["git", "init", "-q", "-b", "main", str(path)], 60)
    (path / ".gitignore").write_text(GITIGNORE)
    sources = write_files(path, leaf_dirs(dirs, "src"), files, (KIB, 50 * KIB), rng, pool, "src")
    binaries = []
    for i, mib in enumerate(bin_mib):
        rel = f"data/blob{i}-{mib}m.bin"
        write_random_file(path / rel, mib * MIB, rng)
        binaries.append(rel)
    venv_dirs = leaf_dirs(max(1, venv_files // 100), ".venv/lib/python3.11/site-packages")
    write_files(path, venv_dirs, venv_files, (200, 3 * KIB), rng, pool, "venv")
    git = [*GIT, "-C", str(path)]
    run_cmd([*git, "add", ".gitignore", "src"], GIT_TIMEOUT_S)
    run_cmd([*git, "commit", "-q", "-m", "main"], GIT_TIMEOUT_S)
    repo = MlRepo(path, sources, binaries)
    repo.branch_paths, repo.changed_bytes = write_branch(path, sources, branch_files, rng, pool)
    repo.bytes_synced = sum((path / r).stat().st_size for r in [".gitignore", *sources, *binaries])
    return repo


def write_branch(path: Path, sources: list[str], n: int, rng: random.Random,
                 pool: bytes) -> tuple[list[str], dict[str, int]]:
    """Branch `other` from main: of n files, 90% rewritten, 5% deleted, 5%
    added. Back on main afterwards. Returns the paths that differ and the
    bytes each checkout writes."""
    git = [*GIT, "-C", str(path)]
    run_cmd([*git, "checkout", "-q", "-b", BRANCH], 60)
    picked = rng.sample(sources, min(n, len(sources)))
    n_del = n_add = max(1, n // 20)
    deleted, rewritten = picked[:n_del], picked[n_del:]
    to_other = to_main = 0
    for rel in rewritten:
        p = path / rel
        to_main += p.stat().st_size
        p.write_bytes(file_content(rng, pool, rng.randint(KIB, 50 * KIB), f"{BRANCH} {rel}"))
        to_other += p.stat().st_size
    for rel in deleted:
        to_main += (path / rel).stat().st_size
        (path / rel).unlink()
    added = [f"src/{BRANCH}/n{j:05d}.py" for j in range(n_add)]
    for j, rel in enumerate(added):
        p = path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(file_content(rng, pool, rng.randint(KIB, 50 * KIB), f"{BRANCH} new {j}"))
        to_other += p.stat().st_size
    run_cmd([*git, "add", "-A", "src"], GIT_TIMEOUT_S)
    run_cmd([*git, "commit", "-q", "-m", BRANCH], GIT_TIMEOUT_S)
    run_cmd([*git, "checkout", "-q", "main"], GIT_TIMEOUT_S)
    return sorted(picked + added), {f"main->{BRANCH}": to_other, f"{BRANCH}->main": to_main}


def checkout(path: Path, branch: str) -> None:
    run_cmd([*GIT, "-C", str(path), "checkout", "-q", branch], GIT_TIMEOUT_S)


def reset_hard(path: Path) -> None:
    """Tracked files back to HEAD (undoes scenario 2's edits)."""
    run_cmd([*GIT, "-C", str(path), "reset", "-q", "--hard"], GIT_TIMEOUT_S)


def write_monorepo(path: Path, files: int, seed: int) -> int:
    """git init + files small text files (200 B - 4 KiB) in ~files/100
    directories; returns the bytes written."""
    rng = random.Random(seed)
    pool = text_pool(rng)
    git_init(path)
    rels = write_files(path, leaf_dirs(max(1, files // 100), "pkg"), files, (200, 4 * KIB), rng, pool, "mono")
    return sum((path / r).stat().st_size for r in rels)


def link_tree(src: Path, dst: Path, skip_top: frozenset[str]) -> None:
    """dst: src's directories, with every file hard-linked (no data copied,
    no inode allocated). Safe only while nothing writes a linked file in
    place: replace files by rename."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in skip_top]
            filenames = [f for f in filenames if f not in skip_top]
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for fn in filenames:
            os.link(os.path.join(dirpath, fn), os.path.join(dst, rel, fn))
