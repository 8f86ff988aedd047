"""The OpenAI Responses API (`/v1/responses`): request models (protocol.py), the translation to
and from the chat pipeline (convert.py, output.py), the response store (store.py) and the
routes (routes.py)."""
