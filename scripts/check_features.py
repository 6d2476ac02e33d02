#!/usr/bin/env python3
"""Fails when the dev-dependencies change a feature of a crate the server is built with.

`cargo build --release` resolves features without the dev-dependencies, `cargo test --release`
with them (Cargo's resolver 2). Where the two differ for a crate, that crate and everything
above it is compiled twice: once for ./build.sh and once for the tests (proptest's bit-set
feature once cost a second build of tract, 9 minutes here). The pins in Cargo.toml keep the
two the same; this check says which crate and feature to pin when a new dependency breaks that.
"""
import collections
import subprocess
import sys


def features(edges):
    out = subprocess.run(
        ["cargo", "tree", "--locked", "-e", edges, "--prefix", "none", "-f", "{p}|{f}"],
        check=True, capture_output=True, text=True).stdout
    seen = collections.defaultdict(set)
    for line in out.splitlines():
        if "|" not in line:
            continue
        pkg, feats = line.split("|", 1)
        pkg = pkg.replace(" (*)", "").replace(" (proc-macro)", "").strip()
        seen[pkg].add(feats.replace(" (*)", "").strip())
    return seen


build = features("normal,build")
test = features("normal,build,dev")
# Every way a crate is built for the server must be one the tests build it (they may add
# others: a dev-dependency of their own, or a crate on the other side of host and target).
bad = [(p, sorted(build[p]), sorted(test[p])) for p in build if not build[p] <= test[p]]
for pkg, b, t in bad:
    print(f"feature check: {pkg}\n  build: {b}\n  tests: {t}", file=sys.stderr)
if bad:
    sys.exit("feature check: the tests would compile these crates (and their dependants) a "
             "second time; pin the tests' features in Cargo.toml's [dependencies]")
print(f"feature check: the tests build the {len(build)} crates of the server with its features")
