"""The child's Celery I/O set-up, on an app that has published nothing yet."""

from kombu import pools

from celery import Celery
from celery_asyncpool.child import celery_io


def test_install_sizes_the_producer_pool_before_any_thread_publishes():
    """Sized later by racing publish threads, kombu raised "Can't shrink pool when in use"."""
    pools.set_limit(10)  # kombu's default, as in a fresh child
    app = Celery("fresh", broker="memory://", backend=None, set_as_current=False)
    app.conf.broker_pool_limit = 1
    celery_io.install(app)
    assert pools.get_limit() == 1
    assert app.amqp.producer_pool.limit == 1
    with app.amqp.producer_pool.acquire(block=True, timeout=1):
        pools.set_limit(1)  # what a second thread's first publish does: no resize, no error
