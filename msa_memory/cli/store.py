"""``msa store ...``: inspect and maintain a store (info, versions, docs, verify, compact, gc, tag,
restore, repair, reindex-lexical). ``msa store reindex-router`` loads a model and is in
:mod:`msa_memory.cli.router`.

Arguments and printing only; the work is done by :mod:`msa_memory.store`.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from msa_memory import errors as E
from msa_memory.cli.common import (EXIT_INTEGRITY, DryRunOpt, JsonOpt, StoreArg, VersionOpt, YesOpt, emit_json, guard,
                                   human_bytes, jsonable, open_version, store_app)

@store_app.command("info", epilog="\b\nExamples:\n  msa store info mem.msa\n  msa store info mem.msa --version 2 --json")
def store_info(store: StoreArg, version: VersionOpt = None, json_out: JsonOpt = False) -> None:
    """Show a store's version, documents, chunks, tokens, bytes and the model that built it."""

    def body() -> None:
        s = open_version(store, version)
        info = {"store": str(store), "version": int(s.version), "latest_version": int(s.latest_version()),
                "identity": s.identity.to_dict(), "tags": s.tags(), **jsonable(s.stats()),
                "router_key_bytes": s.router_key_bytes(), "lexical": s.lexical_info()}
        if json_out:
            emit_json(info)
            return
        ident = s.identity
        typer.echo(f"store   : {store}  (version {info['version']} of {info['latest_version']})")
        typer.echo(f"model   : {ident.model_name}  [{ident.model_fingerprint[:16]}]  router {ident.router_id[:16]}")
        typer.echo(f"layout  : router layers {list(ident.router_layers)}, chunk {ident.chunk_tokens} tokens, "
                   f"{ident.n_kv_heads} kv-heads x {ident.head_dim}, {ident.dtype}, wrap {ident.wrap}")
        if ident.shifted_layers and ident.shifted_window:
            typer.echo(f"shifted : router keys also over {ident.shifted_window}-token windows at a stride of "
                       f"{ident.shifted_window // 2} tokens at layers {list(ident.shifted_layers)}")
        elif ident.shifted_layers:
            typer.echo(f"shifted : router keys also over chunks shifted by {ident.chunk_tokens // 2} tokens at layers "
                       f"{list(ident.shifted_layers)}")
        for k in ("n_docs", "n_chunks", "n_tokens", "n_bytes", "bytes_per_token", "n_shards"):
            if k in info:
                v = info[k]
                typer.echo(f"{k:<8}: {human_bytes(v) if k == 'n_bytes' else (f'{v:,.1f}' if isinstance(v, float) else f'{v:,}')}")
        typer.echo(f"router  : {human_bytes(info['router_key_bytes'])} of router keys (held in memory to route)")
        lex = s.lexical_info()
        typer.echo(f"lexical : {lex['analyzer']} postings on {lex['indexed_shards']} of {lex['n_shards']} shards"
                   + ("" if lex["complete"] else f" (`msa store reindex-lexical {store}` adds the rest)"))
        if info["tags"]:
            typer.echo("tags    : " + ", ".join(f"{k}={v}" for k, v in sorted(info["tags"].items())))

    guard(json_out, body)


@store_app.command("versions", epilog="\b\nExamples:\n  msa store versions mem.msa\n  msa store versions mem.msa --json")
def store_versions(store: StoreArg, json_out: JsonOpt = False) -> None:
    """List the versions of a store (newest last) with their tags."""

    def body() -> None:
        s = open_version(store)
        versions, tags = s.versions(), s.tags()
        by_version: dict[int, list[str]] = {}
        for name, v in tags.items():
            by_version.setdefault(int(v), []).append(name)
        if json_out:
            emit_json({"store": str(store), "latest_version": int(s.latest_version()), "tags": tags, "versions": versions})
            return
        typer.echo(f"{'version':>7}  {'timestamp':<27} {'docs':>8} {'chunks':>9}  {'router':<16}  operation / message")
        for v in versions:
            tag = f"  [{', '.join(sorted(by_version.get(int(v['version']), [])))}]" if by_version.get(int(v["version"])) else ""
            typer.echo(f"{v['version']:>7}  {str(v.get('timestamp', '')):<27} {v.get('n_docs', 0):>8,} {v.get('n_chunks', 0):>9,}  "
                       f"{str(v.get('router_id', ''))[:16]:<16}  {v.get('operation', '')}: {v.get('message', '')}{tag}")

    guard(json_out, body)


@store_app.command("docs", epilog="\b\nExamples:\n  msa store docs mem.msa --limit 20\n  msa store docs mem.msa --path 'corpus/handbook/*' --json")
def store_docs(
    store: StoreArg, version: VersionOpt = None,
    path: Annotated[str | None, typer.Option("--path", help="Only documents whose source path matches this glob")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Show at most this many (0: all)", min=0)] = 50,
    json_out: JsonOpt = False,
) -> None:
    """List the live documents (passages) of a version: id, source, passage, tokens, chunks."""

    def body() -> None:
        import fnmatch

        s = open_version(store, version)
        cols = ["doc_id", "source_path", "passage_index", "n_tokens", "n_chunks", "shard_id"]
        rows = s.documents(columns=cols).to_pylist()
        if path:
            rows = [r for r in rows if fnmatch.fnmatch(r["source_path"], path)]
        total = len(rows)
        shown = rows if limit == 0 else rows[:limit]
        if json_out:
            emit_json({"store": str(store), "version": int(s.version), "total": total, "documents": shown})
            return
        typer.echo(f"{'doc_id':>8}  {'tokens':>7} {'chunks':>6}  source (passage)")
        for r in shown:
            typer.echo(f"{r['doc_id']:>8}  {r['n_tokens']:>7,} {r['n_chunks']:>6}  {r['source_path']} ({r['passage_index']})")
        typer.echo(f"{len(shown)} of {total} documents in version {s.version}")

    guard(json_out, body)


@store_app.command("verify", epilog="\b\nExamples:\n  msa store verify mem.msa\n  msa store verify mem.msa --json   # exit code 4 if anything is wrong")
def store_verify(store: StoreArg, version: VersionOpt = None, json_out: JsonOpt = False) -> None:
    """Check every file of a version against its checksums; exit code 4 if anything is wrong."""

    def body() -> None:
        s = open_version(store, version)
        report = jsonable(s.verify())
        problems = _problems(report)
        if json_out:
            emit_json({"store": str(store), "version": int(s.version), "ok": not problems, "report": report})
        else:
            for p in problems:
                typer.echo(f"problem: {p}")
            typer.echo(f"verify {store} version {s.version}: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
        if problems:
            raise typer.Exit(EXIT_INTEGRITY)

    guard(json_out, body)


def _problems(report: Any) -> list[str]:
    if isinstance(report, dict):
        for key in ("problems", "errors", "issues"):
            if key in report:
                return [str(p) for p in report[key]]
        if report.get("ok") is False:
            return [json.dumps(report, default=str)]
        return []
    if isinstance(report, list):
        return [str(p) for p in report]
    return []


@store_app.command("compact", epilog="\b\nExamples:\n  msa store compact mem.msa\n  msa store compact mem.msa --min-dead-fraction 0.3 --json")
def store_compact(
    store: StoreArg,
    min_dead_fraction: Annotated[float, typer.Option("--min-dead-fraction", help="Rewrite shards whose deleted fraction exceeds this, e.g. 0.3", min=0.0, max=0.999)] = 0.0,
    json_out: JsonOpt = False,
) -> None:
    """Rewrite shards with deleted documents as a new version (same documents, fewer bytes)."""

    def body() -> None:
        s = open_version(store)
        before = s.stats()
        new = s.compact(min_dead_fraction=min_dead_fraction)
        after = new.stats()
        out = {"store": str(store), "read_version": int(s.version), "version": int(new.version),
               "committed": int(new.version) != int(s.version), "n_docs": int(after.get("n_docs", 0)),
               "disk_bytes_before": int(before.get("disk_bytes", 0)), "disk_bytes_after": int(after.get("disk_bytes", 0))}
        if json_out:
            emit_json(out)
        elif out["committed"]:
            typer.echo(f"compacted {store}: version {out['version']}, live shard bytes "
                       f"{human_bytes(out['disk_bytes_before'])} -> {human_bytes(out['disk_bytes_after'])}; "
                       "run `msa store gc` to free the old files")
        else:
            typer.echo(f"compact {store}: nothing to compact, still version {out['version']}")

    guard(json_out, body)


@store_app.command("gc", epilog="\b\nExamples:\n  msa store gc mem.msa --dry-run            # list what would be removed\n  msa store gc mem.msa --keep-last 3 --yes  # drop all but the last 3 versions (tags are kept)")
def store_gc(
    store: StoreArg,
    keep_last: Annotated[int | None, typer.Option("--keep-last", help="Keep only the latest N versions plus tagged ones (default: keep all versions)", min=1)] = None,
    grace_s: Annotated[float, typer.Option("--grace-s", help="Never remove files younger than this many seconds (a job may be about to commit them)", min=0.0)] = 3600.0,
    dry_run: DryRunOpt = False, yes: YesOpt = False, json_out: JsonOpt = False,
) -> None:
    """Remove files no kept version references (orphan shards of failed jobs, compacted shards)."""

    def body() -> None:
        s = open_version(store)
        preview = s.gc(dry_run=True, keep_last=keep_last, grace_s=grace_s)
        n, size = len(preview["orphans"]), human_bytes(preview["bytes"])
        if not dry_run and not yes and (n or preview["removed_versions"]):
            typer.echo(f"gc would remove {n} file(s)/folder(s), {size}, and versions {preview['removed_versions']}", err=True)
            if json_out or not sys.stdin.isatty() or not typer.confirm("Remove them?", err=True):
                raise E.ConfigError("gc needs confirmation.", hint="Pass --yes to remove, or --dry-run to only list.")
        res = preview if dry_run else s.gc(dry_run=False, keep_last=keep_last, grace_s=grace_s)
        if json_out:
            emit_json({"store": str(store), **res})
            return
        for item in res["orphans"]:
            typer.echo(f"  {'would remove' if dry_run else 'removed'} {item['kind']:<9} {item['path']} ({human_bytes(item['bytes'])})")
        if res["young"]:
            typer.echo(f"  kept {len(res['young'])} item(s) younger than {grace_s:g} s (see --grace-s)")
        for item in res.get("skipped", []):
            typer.echo(f"  left alone {item['path']}: {item['reason']}")
        for item in res.get("failed", []):
            typer.echo(f"  could not remove {item['path']}: {item['error']}")
        typer.echo(f"gc {store}{' (dry run)' if dry_run else ''}: {len(res['orphans'])} item(s), "
                   f"{human_bytes(res['bytes'])}{' would be' if dry_run else ''} freed")

    guard(json_out, body)


@store_app.command("tag", epilog="\b\nExamples:\n  msa store tag mem.msa release-1          # tag the latest version\n  msa store tag mem.msa before-cleanup --version 3")
def store_tag(
    store: StoreArg, name: Annotated[str, typer.Argument(help="Tag name, e.g. release-1", show_default=False)],
    version: VersionOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Move the tag if it already exists")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Give a version a name (default: the latest version)."""

    def body() -> None:
        s = open_version(store)
        v = None if version is None else (int(version) if version.isdigit() else int(s.tags()[version]))
        s.tag(name, version=v, force=force)
        tagged = int(open_version(store).tags()[name])
        if json_out:
            emit_json({"store": str(store), "tag": name, "version": tagged})
        else:
            typer.echo(f"tagged version {tagged} of {store} as {name!r}")

    guard(json_out, body)


@store_app.command("restore", epilog="\b\nExamples:\n  msa store restore mem.msa 3 --dry-run\n  msa store restore mem.msa release-1 --yes")
def store_restore(
    store: StoreArg, version: Annotated[str, typer.Argument(help="Version number or tag to restore, e.g. 3", show_default=False)],
    dry_run: DryRunOpt = False, yes: YesOpt = False, json_out: JsonOpt = False,
) -> None:
    """Publish a new version whose content is that of an earlier version (history is kept)."""

    def body() -> None:
        s = open_version(store)
        target = open_version(store, version)
        summary = {"store": str(store), "from_version": int(s.version), "restore_version": int(target.version),
                   "n_docs_now": int(s.stats().get("n_docs", 0)), "n_docs_after": int(target.stats().get("n_docs", 0)),
                   "dry_run": dry_run}
        if dry_run:
            emit_json(summary) if json_out else typer.echo(f"restore (dry run): {json.dumps(summary)}")
            return
        if not yes:
            typer.echo(f"restore would publish version {s.version + 1} with the content of version {target.version} "
                       f"({summary['n_docs_now']} -> {summary['n_docs_after']} documents)", err=True)
            if json_out or not sys.stdin.isatty() or not typer.confirm("Restore?", err=True):
                raise E.ConfigError("restore needs confirmation.", hint="Pass --yes to restore, or --dry-run to preview.")
        s.restore(int(target.version))
        summary["version"] = int(open_version(store).version)
        if json_out:
            emit_json(summary)
        else:
            typer.echo(f"restored version {target.version} of {store} as version {summary['version']}")

    guard(json_out, body)


@store_app.command("repair", epilog="\b\nExamples:\n  msa store repair mem.msa --dry-run   # say what is wrong and what repair would do\n  msa store repair mem.msa --yes       # set damaged manifests aside, publish the newest good version")
def store_repair(store: StoreArg, dry_run: DryRunOpt = False, yes: YesOpt = False, json_out: JsonOpt = False) -> None:
    """Repair damaged or lost version manifests: set them aside and publish the newest good version anew."""

    def body() -> None:
        from msa_memory.store.repair import repair

        plan = repair(store, dry_run=True)
        if not dry_run and not yes and not plan["ok"]:
            for p in plan["problems"]:
                typer.echo(f"problem: {p['path']}: {p['problem']}", err=True)
            if json_out or not sys.stdin.isatty() or not typer.confirm("Repair?", err=True):
                raise E.ConfigError("repair needs confirmation.", hint="Pass --yes to repair, or --dry-run to preview.")
        res = plan if dry_run or plan["ok"] else repair(store, dry_run=False)
        if json_out:
            emit_json(res)
            return
        if res["ok"]:
            typer.echo(f"repair {store}: nothing to repair (version {res['newest_good_version']} is the latest)")
            return
        for p in res["problems"]:
            typer.echo(f"problem: {p['path']}: {p['problem']}")
        for m in res["moved"]:
            typer.echo(f"  {'would move' if dry_run else 'moved'} {m['from']} -> {m['to']} (kept, not deleted)")
        if res["version"] is not None:
            typer.echo(f"  {'would publish' if dry_run else 'published'} version {res['version']} with the content of "
                       f"version {res['newest_good_version']}")
        if res["hint_rewritten"]:
            typer.echo(f"  {'would point' if dry_run else 'pointed'} versions/_latest.json at the latest version")
        if res["unreferenced_shards"]:
            typer.echo(f"  shards no good version names (they may hold documents of a lost version; gc removes them "
                       f"after --grace-s, re-encoding brings the documents back): {', '.join(res['unreferenced_shards'])}")
        typer.echo(f"repair {store}{' (dry run)' if dry_run else ''}: {len(res['problems'])} problem(s)"
                   + (", nothing changed" if dry_run else ""))

    guard(json_out, body)


@store_app.command("reindex-lexical", epilog="\b\nExamples:\n  msa store reindex-lexical mem.msa          # index what lacks one, as a new version\n  msa store reindex-lexical mem.msa --json")
def store_reindex_lexical(
    store: StoreArg,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message of the new version")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Add the lexical index (BM25 postings, for --retriever hybrid) to every shard that lacks it, as a new version.

    Reads the documents' stored text (no model, no re-encoding); shards that have postings of this
    release's analyzer are left as they are, and older versions keep what they had.
    """

    def body() -> None:
        import time

        s = open_version(store)
        t0 = time.perf_counter()
        new = s.reindex_lexical(message=message or "")
        info = new.lexical_info()
        out = {"store": str(store), "read_version": int(s.version), "version": int(new.version),
               "committed": int(new.version) != int(s.version), "analyzer": info["analyzer"],
               "shards": info["n_shards"], "indexed_shards": info["indexed_shards"],
               "seconds": round(time.perf_counter() - t0, 3)}
        if json_out:
            emit_json(out)
        elif out["committed"]:
            typer.echo(f"version {out['version']} of {store}: lexical index ({out['analyzer']}) on all {out['shards']} "
                       f"shards in {out['seconds']:.2f}s; versions before it keep what they had")
        else:
            typer.echo(f"version {out['version']} of {store} has a lexical index ({out['analyzer']}) on all "
                       f"{out['shards']} shards; nothing to do")

    guard(json_out, body)
