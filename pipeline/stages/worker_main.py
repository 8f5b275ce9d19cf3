"""The extraction worker process's side: one JSON request per line in, one JSON reply per line out.

``extract_worker`` starts each worker as a fresh interpreter running ``pipeline.stages.extract_worker`` as
``__main__``, which calls ``serve`` here with the memory cap; the pool's side of the pipes stays there.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import gc
import json
import os
import resource
import select
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from ..config import IngestConfig
from ..errors import IngestError, ParseError, task_io_class
from .parse import summarize_message
from .pdf_text import OpenDocuments, extract_text


def serve(memory_limit: int) -> None:
    """Worker main loop: one JSON request per line in, one JSON reply per line out, until stdin closes.

    SIGINT, SIGTERM and SIGHUP are ignored (systemd signals the whole cgroup, a closed terminal the whole
    process group, and a document in flight should end with its real outcome); the parent stops a worker by
    closing its stdin or killing it.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    faulthandler.enable()  # a fatal signal (PDFium aborting under the cap) leaves its stack on stderr as evidence
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol
    documents = OpenDocuments()  # a document's next chunk usually comes back to the same worker
    preloaded = False
    _settle_heap()
    while True:
        if not preloaded and not select.select([sys.stdin], [], [], 0)[0]:  # idle: no request waits
            _preload_engine()
            preloaded = True
            if not len(documents):  # nothing a request made is alive: only the engine's import is settled
                _settle_heap()
        line = sys.stdin.readline()
        if not line:
            return
        reply = _answer(line, memory_limit, documents)
        try:
            out.write(json.dumps(reply) + "\n")
            out.flush()
        except BrokenPipeError:  # the parent is gone; point stdout at /dev/null so exiting cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
            return
        gc.collect()


def _settle_heap() -> None:
    """Collect, then move every object alive now (modules, classes, the engine's bindings) out of the cycle
    collector's sight for good (``gc.freeze``).

    The full collection after each request then walks only what requests made: it cost 2.5 ms a request
    with PDFium loaded, more than parsing a small mail (issue 16). Frozen objects are still freed by their
    reference counts, but a frozen cycle never is: so this runs only while no request's objects are alive
    (at start, and after the preload if no document is cached; if one is, the engine's import stays unfrozen
    in that worker, which costs time, not memory).
    """
    gc.collect()
    gc.freeze()


def _preload_engine() -> None:
    """Import PDFium (the default engine) while idle, so the first document does not wait for it.

    A worker started ahead of its first request (``ExtractionPool.start_workers``) would otherwise spend its
    idle time waiting and the document's time importing (issue 16). A failure here is left to that document.
    """
    try:
        import pypdfium2  # noqa: F401
    except (ImportError, MemoryError, OSError) as exc:  # the request that needs it reports it, typed
        print(f"could not preload pypdfium2: {type(exc).__name__}: {exc}", file=sys.stderr)


def _answer(line: str, memory_limit: int, documents: OpenDocuments) -> dict[str, Any]:
    """Run one request (extract pages, or parse an email); every exception becomes a typed error reply."""
    doing = "extraction"
    try:
        request = json.loads(line)
        limits = IngestConfig(**request["limits"])
        if request.get("op") == "parse":
            doing = "parsing"
            raw = Path(request["spool"]).read_bytes()  # read here: the serve process never holds the message
            return {"ok": summarize_message(raw, Path(request["work_dir"]), limits)}
        chunk = request.get("chunk")
        result = extract_text(Path(request["pdf"]), Path(request["text"]), limits, tuple(request.get("shard", (0, 1))),
                              tuple(chunk) if chunk else None, float(request.get("slice_s", 0.0)), documents)
        return {"ok": dataclasses.asdict(result)}
    except (IngestError, ParseError) as exc:
        return _error_reply(type(exc).__name__, str(exc))
    except MemoryError:
        return _error_reply("PdfTooLargeError", f"{doing} needed more than {memory_limit:,} bytes of memory")
    except OSError as exc:  # the disk, not the document (PDFium and pypdf raise their own errors for those):
        # the spool file, the attachments' folder, the PDF or its text file; retryable, the disk may have room
        # by the next try, and the sender is not told the PDF could not be read
        return _error_reply(task_io_class(exc).__name__, f"{doing}: {type(exc).__name__}: {exc}"[:500])
    except Exception as exc:  # engine errors are CorruptPdfError already; this is a bug or the disk (the text file)
        traceback.print_exc()
        # an unexpected error of the parse stays untyped (retryable), as it was in the pipeline process
        cls = "IngestError" if doing == "extraction" else "PipelineError"
        return _error_reply(cls, f"{doing} failed: {type(exc).__name__}: {exc}"[:500])


def _error_reply(cls: str, message: str) -> dict[str, Any]:
    return {"error": {"cls": cls, "message": message}}
