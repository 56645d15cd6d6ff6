"""Shared by the Python drivers: empty an agent's rate-limit burst, and
record each HTTP attempt a client makes (status, AEX's retry headers, and
how long the client waited before retrying)."""
import time
import openai


def use_up_burst(base, token, model="sim", limit=200):
    """Calls with retries off until AEX refuses one (a fixed count would race
    the refill on a slow machine); returns how many were served."""
    probe = openai.OpenAI(base_url=base, api_key=token, max_retries=0)
    for served in range(limit):
        try:
            probe.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        except openai.RateLimitError:
            return served
    raise RuntimeError(f"no 429 after {limit} calls")


class Attempts:
    """httpx event hooks; `sync_client()` / `async_client()` give clients
    that record into this list."""

    def __init__(self):
        self.attempts = []

    def _sent(self, request):
        self.attempts.append({"sent": time.monotonic()})

    def _answered(self, response):
        self.attempts[-1].update(status=response.status_code, answered=time.monotonic(),
                                 retry_after_ms=response.headers.get("retry-after-ms"),
                                 retry_after=response.headers.get("retry-after"))

    def sync_client(self):
        return openai.DefaultHttpxClient(event_hooks={"request": [self._sent], "response": [self._answered]})

    def async_client(self):
        async def sent(request):
            self._sent(request)

        async def answered(response):
            self._answered(response)

        return openai.DefaultAsyncHttpxClient(event_hooks={"request": [sent], "response": [answered]})

    def report(self, burned):
        a = self.attempts
        return {
            "burned": burned,
            "statuses": [x.get("status") for x in a],
            "retry_after_ms": [x.get("retry_after_ms") for x in a],
            "retry_after": [x.get("retry_after") for x in a],
            # How long the client waited between an answer and its retry.
            "waited_ms": [round((b["sent"] - x["answered"]) * 1000) for x, b in zip(a, a[1:])],
        }
