"""Print the requests that ``make serve`` suggests, for the port and model name it serves on."""

from __future__ import annotations

import argparse

TEMPLATE = """
The predictor is starting on http://localhost:{port} (HTTP) and localhost:{grpc} (gRPC).
When the log says "Uvicorn running", try, from another terminal:

  curl -s http://localhost:{port}/v1/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{name}", "prompt": "The three primary colors are", "max_tokens": 32, "temperature": 0}}'

  .venv/bin/python -c "from openai import OpenAI; c = OpenAI(base_url='http://localhost:{port}/v1', api_key='none'); \\
r = c.chat.completions.create(model='{name}', messages=[{{'role': 'user', 'content': 'What is the capital of France?'}}], max_tokens=48); \\
print(r.choices[0].message.content)"

More endpoints (V2 infer over REST and gRPC, V1 predict, generate, generate_stream): see README.md.
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http_port", type=int, default=8080)
    parser.add_argument("--grpc_port", type=int, default=8081)
    parser.add_argument("--model_name", default="smollm2")
    args = parser.parse_args()
    print(TEMPLATE.format(port=args.http_port, grpc=args.grpc_port, name=args.model_name))


if __name__ == "__main__":
    main()
