"""`simpletuner cache [verify|prune] CONFIG [--key value ...]`: build, check and trim the caches.

    simpletuner cache CONFIG            encode the latents and text embeddings the stores lack
    simpletuner cache verify CONFIG     check every shard and entry; --repair drops bad entries
    simpletuner cache verify --store L  check one cache location (folder or s3://)
    simpletuner cache prune CONFIG      remove caches the configuration no longer uses
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simpletuner.config.load import Settings

ACCEPTS_OVERRIDES = True
ACTIONS = ("verify", "prune")
STORE_FOLDERS = ("vae", "text")  # default cache sub-folders under cache_dir that hold tensor stores


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", metavar="[verify|prune] CONFIG",
                        help="configuration file, optionally after an action: verify (check shards and "
                        "entries) or prune (remove caches the configuration no longer uses)")
    parser.add_argument("config", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--store", action="append", default=[], metavar="LOCATION",
                        help="verify: a cache location (folder or s3://) to check, instead of or besides "
                        "those of CONFIG; repeatable")
    parser.add_argument("--repair", action="store_true",
                        help="verify: drop corrupt or missing entries from the manifest and delete files no "
                        "manifest names (older than an hour); the next cache run re-encodes what was dropped")
    parser.add_argument("--dry-run", action="store_true", help="prune: only report what would be removed")


@dataclass(frozen=True)
class CacheTarget:
    """One tensor store a configuration uses."""

    kind: str  # "latents" or "text"
    location: str
    users: tuple[str, ...]  # ids of the datasets that read it
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def run(args: argparse.Namespace) -> int:
    from simpletuner.errors import UserError

    action, config = _action_and_config(args)
    if action == "verify":
        return verify_command(config, args.overrides or [], args.store, args.repair)
    if args.store:
        raise UserError("--store is only for `simpletuner cache verify`")
    if config is None:
        raise UserError(f"simpletuner cache {action or ''}: give a configuration file "
                        "(e.g. `simpletuner cache prune config.toml`)".replace("  ", " "))
    settings = _load(config, args.overrides or [])
    if action == "prune":
        return prune_command(settings, dry_run=args.dry_run)
    return encode_caches(settings)


def _action_and_config(args: argparse.Namespace) -> tuple[str | None, str | None]:
    from simpletuner.errors import UserError

    if args.target in ACTIONS:
        if args.config is None and args.overrides and not args.overrides[0].startswith("--"):
            # `cache verify --repair CONFIG`: argparse took the flag first and left CONFIG among the overrides
            return args.target, args.overrides.pop(0)
        return args.target, args.config
    if args.config is not None:
        raise UserError(f"simpletuner cache: unknown action {args.target!r}; actions: {', '.join(ACTIONS)} "
                        "(or give just the configuration file to build the caches)")
    return None, args.target


def _load(config: str, overrides: list[str]) -> "Settings":
    from simpletuner.config.load import load_settings
    from simpletuner.models.registry import with_checkpoint

    return with_checkpoint(load_settings(config, overrides))


def cache_targets(settings: "Settings") -> list[CacheTarget]:
    """The latent and text stores of the configuration's datasets, checked to lie outside every dataset."""
    from simpletuner.cache.location import inside, storage_options_for
    from simpletuner.config.references import latent_cache_for, text_cache_for
    from simpletuner.errors import ConfigError

    training, datasets = settings.training, settings.datasets
    by_location: dict[tuple[str, str], tuple[list[str], Any]] = {}
    for dataset in datasets:
        if dataset.dataset_type != "image":
            continue
        latent = latent_cache_for(dataset, training)
        by_location.setdefault(("latents", latent), ([], dataset if dataset.type == "aws" else None))[0].append(
            dataset.id)
        text = text_cache_for(dataset, datasets, training)
        owner = next((d for d in datasets if d.id == text.dataset_id and d.type == "aws"), None)
        by_location.setdefault(("text", text.location), ([], owner))[0].append(dataset.id)
    targets = [CacheTarget(kind, location, tuple(users), storage_options_for(location, owner))
               for (kind, location), (users, owner) in by_location.items()]
    for target in targets:
        for dataset in datasets:
            if dataset.dataset_type != "text_embeds" and inside(target.location, dataset.location()):
                raise ConfigError(f"the {target.kind} cache of dataset(s) {', '.join(target.users)} is "
                                  f"{target.location!r}, inside dataset {dataset.id!r} ({dataset.location()}); "
                                  "caches never go inside a dataset: set cache_dir_vae / cache_dir elsewhere")
    return targets


def _exists(location: str, storage_options: dict[str, Any]) -> bool:
    from simpletuner.cache.location import Location
    from simpletuner.cache.format import MANIFEST, SHARDS

    place = Location(location, storage_options)
    return bool(place.list(MANIFEST) or place.list(SHARDS))


def verify_command(config: str | None, overrides: list[str], stores: list[str], repair: bool) -> int:
    """Verify the configuration's stores and/or the given locations; 0 when all are sound."""
    from simpletuner.cache.location import storage_options_for
    from simpletuner.cache.maintenance import repair as repair_store
    from simpletuner.cache.maintenance import verify
    from simpletuner.cache.store import TensorStore
    from simpletuner.errors import UserError

    targets = cache_targets(_load(config, overrides)) if config else []
    targets += [CacheTarget("store", s, ("--store",), storage_options_for(s)) for s in stores]
    if not targets:
        raise UserError("simpletuner cache verify: give a configuration file or --store LOCATION")
    problems = 0
    for target in targets:
        if not _exists(target.location, target.storage_options):
            print(f"cache {target.location} ({target.kind}): not built yet")
            continue
        store = TensorStore(target.location, storage_options=target.storage_options)
        report = verify(store, progress=sys.stderr.isatty())
        print(report.summary())
        if repair and (not report.ok or report.orphan_files):
            dropped = repair_store(store, report)
            print(f"  repaired: dropped {dropped} entr(y/ies); {len(store)} remain")
            report = verify(store)
        problems += not report.ok
    return 1 if problems else 0


def prune_command(settings: "Settings", dry_run: bool = False) -> int:
    """Remove stores under cache_dir that no dataset of the configuration uses, then dead entries."""
    from simpletuner.cache.maintenance import prune
    from simpletuner.cache.store import TensorStore

    targets = cache_targets(settings)
    for folder in unused_stores(settings, targets):
        print(f"{'would remove' if dry_run else 'removing'} unused cache {folder}")
        if not dry_run:
            _remove_store(folder)
    present = [target for target in targets if _exists(target.location, target.storage_options)]
    every_live = live_keys(settings) if present else {}
    for target in present:
        store = TensorStore(target.location, storage_options=target.storage_options)
        keys = every_live.get(store.url, set())
        dead = len(store) - int(store.contains_many(sorted(keys)).sum())
        if dry_run:
            print(f"cache {target.location}: would remove {dead} of {len(store)} entries")
        else:
            print(f"cache {target.location}: {prune(store, keys).summary()}")
    return 0


def unused_stores(settings: "Settings", targets: list[CacheTarget]) -> list[str]:
    """Stores in cache_dir/vae/* and cache_dir/text/* (local) that neither enabled nor disabled datasets use."""
    import os

    from simpletuner.cache.location import is_remote
    from simpletuner.config.references import latent_cache_for

    root = settings.training.cache_dir
    if is_remote(root):
        return []
    used = {os.path.realpath(t.location) for t in targets if not is_remote(t.location)}
    used |= {os.path.realpath(latent_cache_for(d, settings.training)) for d in settings.disabled_datasets}
    used |= {os.path.realpath(d.cache_dir) for d in settings.disabled_datasets if d.cache_dir}
    found = []
    for sub in STORE_FOLDERS:
        base = os.path.join(root, sub)
        candidates = [base] + ([e.path for e in os.scandir(base) if e.is_dir()] if os.path.isdir(base) else [])
        for folder in candidates:
            real = os.path.realpath(folder)
            looks_like_store = os.path.isdir(os.path.join(folder, "manifest"))
            if looks_like_store and real not in used and not any(u.startswith(real + os.sep) for u in used):
                found.append(folder)
    return sorted(found)


def _remove_store(folder: str) -> None:
    """Delete a store's own files and folders (nothing else that may sit beside them)."""
    import os
    import shutil

    from simpletuner.cache.format import FAILURES, MANIFEST, SHARDS

    for sub in (MANIFEST, SHARDS, FAILURES):  # manifest first: a half-removed store reads as empty
        shutil.rmtree(os.path.join(folder, sub), ignore_errors=True)
    if not os.listdir(folder):
        os.rmdir(folder)


def live_keys(settings: "Settings") -> dict[str, set[str]]:
    """Store location -> every key the configuration reads from it (loads the model's encoders)."""
    from simpletuner.models.registry import get_family
    from simpletuner.train.data import TrainingData

    family = get_family(settings.training.model_family)
    data = TrainingData.prepare(settings, family, family.load(settings.training))
    keys = data.live_keys()
    for store in data.stores():
        store.close()
    return keys


def encode_caches(settings: "Settings") -> int:
    """Scan the datasets and encode every latent and caption the stores lack (what `train` does first)."""
    from simpletuner.models.registry import get_family
    from simpletuner.train.setup import make_accelerator, prepare_data

    accelerator = make_accelerator(settings)
    family = get_family(settings.training.model_family)
    components = family.load(settings.training).to(accelerator.device)
    prepare_data(settings, family, components, accelerator).close()  # everything now, whatever on-demand says
    return 0
