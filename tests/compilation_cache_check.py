"""Run twice by tests/test_compilation_cache.py: generates once with the persistent compilation
cache in argv[1] and prints how many compilations hit and missed it."""
import json
import sys

import jax

events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))

from sdjax.weights.presets import random_pretrained  # noqa: E402
from sdjax.sampling.exported import enable_compilation_cache
from sdjax.sampling.generator import Generator
from sdjax.sampling.requests import Request
from sdjax.sampling.spec import SamplingSpec  # noqa: E402


def main():
    enable_compilation_cache(sys.argv[1])
    generator = Generator(random_pretrained("tiny"))
    generator(Request(prompt="a red circle"), SamplingSpec(steps=3, height=32, width=32))
    print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"),
                      "misses": events.count("/jax/compilation_cache/cache_misses")}))


if __name__ == "__main__":
    main()
