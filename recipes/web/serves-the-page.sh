#!/bin/sh
# recipes/web's [[test]]: httpd (detached once it listens) serves the
# page, fetched over loopback; the page reaches the console.
set -e
httpd -p 127.0.0.1:8080 -h /srv/www
wget -q -O - http://127.0.0.1:8080/
