"""``dgxqueue web``: the status page (an optional extra: ``pip install 'dgxqueue[web]'``).

Pages: the overview (live), the daemons with their running jobs' progress, the jobs list
(filtered, paginated by keyset), one job with its player; a JSON API under ``/api/`` with the
same data; actions (cancel, retry, pause/resume, enqueue) as POSTs with CSRF tokens. See
:mod:`dgxqueue.web.security` for what guards it, and the README's "Status page".
"""

from dgxqueue.web.app import WebOptions, create_app

__all__ = ["WebOptions", "create_app"]
