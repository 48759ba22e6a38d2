"""Back up the SuperLink's state database with SQLite's online backup API.

    python -m melody_audit.backup DATABASE BACKUP_DIR --keep N

Copies a consistent snapshot while the SuperLink keeps writing, into
BACKUP_DIR/state-YYYYmmddTHHMMSSZ.db, then deletes the oldest backups
beyond the newest N. A systemd timer on the SuperLink host runs it.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger("melody_audit.backup")

BACKUP_PATTERN = "state-*.db"


def back_up(database: Path, backup_dir: Path, keep: int) -> Path:
    """Write one snapshot of `database` and prune old ones; return the snapshot's path."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = backup_dir / f"state-{stamp}.db"
    partial = target.with_suffix(".db.partial")

    # Open read-only so a missing database raises instead of being created empty.
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        destination = sqlite3.connect(partial)
        try:
            source.backup(destination)
        finally:
            destination.close()
    finally:
        source.close()
    partial.replace(target)

    backups = sorted(backup_dir.glob(BACKUP_PATTERN))
    for old in backups[:-keep]:
        old.unlink()
        logger.info("deleted old backup %s", old)
    return target


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", type=Path, help="SQLite database to back up")
    parser.add_argument("backup_dir", type=Path, help="folder for the snapshots")
    parser.add_argument("--keep", type=int, default=30, help="number of newest snapshots kept (default: 30)")
    args = parser.parse_args(argv)
    if args.keep < 1:
        parser.error(f"--keep {args.keep} must be 1 or more")

    try:
        target = back_up(args.database, args.backup_dir, args.keep)
    except (sqlite3.Error, OSError) as error:
        logger.error("backup of %s into %s failed: %s", args.database, args.backup_dir, error)
        return 1
    logger.info("backed up %s to %s", args.database, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
