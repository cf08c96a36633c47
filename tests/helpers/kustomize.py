"""Render a kustomization the way ``kubectl kustomize`` would, for the features deploy/kubernetes uses.

Neither kubectl nor kustomize is a Debian or PyPI package, so the tests cannot count on either: they
render the overlays with this, and where a kubectl happens to be installed, test_deploy.py checks that
``kubectl kustomize`` prints the same objects. It implements only what our kustomizations use:

- ``resources``: files (all their YAML documents) and directories holding a kustomization.yaml,
  rendered recursively, in order;
- ``namespace``: set on every namespaced object (not on Namespace, whose name it leaves alone);
- ``patches`` with ``path``: a strategic-merge patch, matched by kind, name and namespace. Maps
  merge key by key; a list of objects merges item by item on Kubernetes' patch merge key for that
  field (the table below, from the API's ``x-kubernetes-patch-merge-key``); any other list, and
  every scalar, is replaced.

Any other field of a kustomization (images, configMapGenerator, inline patches, JSON 6902
patches, ``$patch`` directives ...) is refused with a ValueError rather than ignored, so a
kustomization that starts using one fails its test instead of rendering something kubectl would not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# field name → the key its list items merge on (core/v1 and apps/v1 schemas).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
KNOWN = {"apiVersion", "kind", "resources", "namespace", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` would print, in resource order."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = sorted(set(spec) - KNOWN)
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: this renderer does not implement {unknown}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", ()):
        target = directory / entry
        if target.is_dir():
            objects += render(target)
        else:
            objects += [d for d in yaml.safe_load_all(target.read_text()) if d]
    for patch in spec.get("patches", ()):
        if set(patch) != {"path"}:
            raise ValueError(f"{directory}/kustomization.yaml: only patches with a path are implemented, got {patch}")
        for doc in (d for d in yaml.safe_load_all((directory / patch["path"]).read_text()) if d):
            (obj,) = [o for o in objects if _ident(o) == _ident(doc)] or [None]
            if obj is None:
                raise ValueError(f"{directory}/{patch['path']}: no resource {_ident(doc)} to patch")
            merge(obj, doc)
    namespace = spec.get("namespace")
    if namespace is not None:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = namespace
    return objects


def _ident(obj: dict[str, Any]) -> tuple[str, str, str | None]:
    meta = obj.get("metadata", {})
    return obj["kind"], meta["name"], meta.get("namespace")


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Strategic-merge ``patch`` into ``target`` in place."""
    for key, value in patch.items():
        if key.startswith("$"):
            raise ValueError(f"patch directive {key}: {value!r} is not implemented")
        old = target.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            merge(old, value)
        elif isinstance(value, list) and isinstance(old, list) and key in MERGE_KEYS:
            on = MERGE_KEYS[key]
            added = []
            for item in value:
                same = [o for o in old if o.get(on) == item.get(on)]
                if same:
                    merge(same[0], item)
                else:
                    added.append(item)
            old[:0] = added  # kustomize puts the patch's new items first, in the patch's order
        else:
            target[key] = value
