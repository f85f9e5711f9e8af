"""Locust load test for /predictions/all:  locust -f load_tests --host http://127.0.0.1:8080

Each simulated user PUTs one of the sample photos (random choice) and checks that the answer is
HTTP 200 with the response schema; anything else is a Locust failure. `make load` runs it headless
against the `make serve` server and writes CSV statistics to outputs/load/.
"""

from .locustfile import DetectionUser  # noqa: F401  (Locust collects User classes from the package)
