"""`rlhfkit label`: collect human rankings, flags and demonstrations in a small web app.

``store.py`` holds the tables and every transaction, ``app.py`` the web pages, ``agreement.py``
the inter-labeller agreement math, ``tasks.py`` where tasks come from (a file or a model),
``export.py`` the training files, ``cli.py`` the commands.
"""
