"""The HTTP front end (the `serve` extra): api.py is the OpenAI chat wire format (pydantic request
models, response bodies), server.py serves it with Starlette on uvicorn (`python -m runtime serve`)."""
