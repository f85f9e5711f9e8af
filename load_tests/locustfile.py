"""A user that sends real JPEGs to /predictions/all and checks every response."""

from __future__ import annotations

import random
from pathlib import Path

from locust import HttpUser, constant, task

IMAGES = sorted((Path(__file__).parent / "images").glob("*.jpg"))
PHOTOS = [(p.name, p.read_bytes()) for p in IMAGES]
REQUIRED = {"image", "optimization", "device", "detections", "models", "timing_ms"}


class DetectionUser(HttpUser):
    wait_time = constant(0)  # closed loop: each user sends its next request when the last one returns
    models: list[str] | None = None  # the served set's model names, from the first answer (any set works)

    @task
    def detect(self) -> None:
        name, body = random.choice(PHOTOS)
        with self.client.put("/predictions/all", data=body, name="/predictions/all", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{name}: HTTP {response.status_code}: {response.text[:200]}")
                return
            try:
                result = response.json()
            except ValueError:
                response.failure(f"{name}: response is not JSON")
                return
            missing = REQUIRED - set(result)
            if missing:
                response.failure(f"{name}: response lacks {sorted(missing)}")
                return
            names = [m.get("name") for m in result["models"]]
            if self.models is None and names:
                self.models = names
            if not names or names != self.models:
                response.failure(f"{name}: models {names}, expected every model of the set {self.models}")
            else:
                response.success()
