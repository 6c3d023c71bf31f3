#!/usr/bin/env python3
"""Packs a root filesystem tarball as a single-layer image archive (the
`docker save` format, which `ctr images import` reads), so the test cluster
runs images built here from Debian packages and never pulls from a registry.

    image.py ROOTFS.tar NAME:TAG OUT.tar [--entrypoint ARG]...
"""
import hashlib
import io
import json
import os
import sys
import tarfile


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    args = sys.argv[1:]
    if len(args) < 3:
        sys.exit(__doc__)
    rootfs, name, out = args[:3]
    cmd = args[3:] or ["/bin/sh"]
    diff_id = sha256_file(rootfs)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
        "history": [{"created_by": "bridge tests/k8s/image.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [name], "Layers": [diff_id + "/layer.tar"]}]
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w") as t:
        def add_bytes(arcname, data):
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            info.mode = 0o644
            t.addfile(info, io.BytesIO(data))

        add_bytes(config_name, config_bytes)
        t.add(rootfs, arcname=diff_id + "/layer.tar")
        add_bytes("manifest.json", json.dumps(manifest).encode())
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
