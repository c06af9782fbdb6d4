#!/bin/sh
# Guest side of run-exit-status: the entrypoint's status becomes kiln run's.
echo "exiting with 7"
exit 7
