"""`rdm serve`: one process holding one pipeline and one database registry, behind an HTTP API and a page.

    config.py                 ServeConfig: where to bind, what to serve, every limit
    validation.py             request models and their bounds (each failure a clear 4xx)
    images.py                 uploads and database images through rdm.images.decode; thumbnails; the URL-fetch rule
    engine.py                 the loaded pipeline, embedder and registry: embed, retrieve, sample a batch
    jobs.py                   the bounded job queue, the batching worker, progress and results in memory
    clip_retrieval_compat.py  /knn-service, /indices-list, /metadata as clip-retrieval's ClipClient expects
    app.py                    the FastAPI application: routes, trust rules, error handlers, the page
    server.py                 uvicorn with a shutdown that reports every job in flight
    static/                   the page: index.html, app.js, style.css (no build step)
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
