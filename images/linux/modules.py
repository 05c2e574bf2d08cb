"""Kernel module load order from the modules' own metadata (no depmod, no modules.dep).

``depends=`` lists hard dependencies by module name; ``softdep=pre: ... post: ...`` lists
modules (or aliases such as ``crypto-crc32c``) that must be loaded before or after.  Names are
compared with ``-`` and ``_`` treated alike, as the kernel does.
"""

from __future__ import annotations

import fnmatch
from functools import cache
from pathlib import Path

from elfinfo import modinfo


def canonical(name: str) -> str:
    return name.replace("-", "_")


class ModuleTree:
    """The ``.ko`` files under ``lib/modules/VERSION`` of an unpacked kernel package."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = {canonical(p.name[:-3]): p for p in sorted(root.rglob("*.ko"))}

    @cache  # noqa: B019 - one tree per build, kept for the build's lifetime
    def info(self, name: str) -> dict[str, list[str]]:
        return modinfo(self.paths[name])

    @cache  # noqa: B019
    def _aliases(self) -> list[tuple[str, str]]:
        return [(pattern, name) for name in self.paths
                for pattern in self.info(name).get("alias", [])]

    def resolve(self, wanted: str) -> list[str]:
        """Module names for a module name or an alias (several modules may offer one alias)."""
        if canonical(wanted) in self.paths:
            return [canonical(wanted)]
        found = sorted({name for pattern, name in self._aliases()
                        if fnmatch.fnmatchcase(wanted, pattern)})
        if not found:
            raise KeyError(f"no kernel module or alias named {wanted!r}")
        return found

    def _edges(self, name: str) -> tuple[list[str], list[str]]:
        info = self.info(name)
        pre = [dep for field in info.get("depends", []) for dep in field.split(",") if dep]
        post: list[str] = []
        for field in info.get("softdep", []):
            target = pre
            for word in field.split():
                if word in ("pre:", "post:"):
                    target = pre if word == "pre:" else post
                else:
                    target.append(word)
        return pre, post

    def load_order(self, roots: list[str]) -> list[str]:
        """Every module ``roots`` need, each after what it depends on, roots in given order."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in order or name in visiting:
                return
            visiting.add(name)
            pre, post = self._edges(name)
            for dep in pre:
                for module in self.resolve(dep):
                    visit(module)
            order.append(name)
            for dep in post:
                for module in self.resolve(dep):
                    visit(module)

        for root in roots:
            for module in self.resolve(root):
                visit(module)
        return order
