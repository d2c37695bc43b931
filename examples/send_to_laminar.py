# Run: LMNR_PROJECT_API_KEY=<your project key> python examples/send_to_laminar.py
# (then: curl 'localhost:8000/ask?question=why'; the trace appears in your Laminar project)
# Needs: pip install 'laminar-middleware[fastapi]' uvicorn lmnr
"""Send the middleware's spans to Laminar with the `lmnr` SDK (`pip install lmnr`).

`Laminar.initialize()` reads the project key from the `LMNR_PROJECT_API_KEY` environment
variable (or takes `project_api_key=`) and sets up the SDK's exporter. It is called in
`main()`, not at import, so importing this file needs no key and no network. The
middleware's SERVER span then goes to Laminar like the SDK's own spans, and spans made with
`@observe` inside a handler are its children; a caller that sent `X-Laminar-Span-Context`
(another service with this package, or Laminar's Python or TypeScript SDK) is the parent.
"""

from __future__ import annotations

import os

import uvicorn
from fastapi import FastAPI
from lmnr import Laminar, observe

from laminar_middleware import LaminarASGIMiddleware

app = FastAPI()
app.add_middleware(LaminarASGIMiddleware)


@observe(name="answer")
def answer(question: str) -> str:
    return f"You asked {question!r}; an LLM call would go here."


@app.get("/ask")
def ask(question: str = "why?") -> dict[str, str]:
    return {"answer": answer(question)}


def main() -> None:
    if not os.environ.get("LMNR_PROJECT_API_KEY"):
        raise SystemExit("set LMNR_PROJECT_API_KEY to your Laminar project API key")
    Laminar.initialize()  # also sets the global tracer provider the middleware uses
    try:
        uvicorn.run(app, host="127.0.0.1", port=8000)
    finally:
        Laminar.shutdown()  # flush the last spans


if __name__ == "__main__":
    main()
