"""An OpenAI-compatible Images API server (``python -m dalle3_fast.serve --help``).

    from dalle3_fast.serve import ServeConfig, create_app
    app = create_app(Dalle3Pipeline.from_pretrained(DIR), ServeConfig(max_batch=8))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Any OpenAI client works unchanged: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)``.
"""
from dalle3_fast.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
