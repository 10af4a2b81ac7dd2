"""Process entry points: the Celery worker, beat, and Flower's configuration."""
