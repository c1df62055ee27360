"""Validate JSON instances against JSON Schemas (Draft 2020-12) with the `jsonschema`
package. Reads a JSON list of {"schema": ..., "instance": ...} on stdin; prints each
failure and exits 1 if any instance does not validate."""
import json
import sys

from jsonschema import Draft202012Validator

cases = json.load(sys.stdin)
bad = 0
for i, c in enumerate(cases):
    Draft202012Validator.check_schema(c["schema"])
    errors = list(Draft202012Validator(c["schema"]).iter_errors(c["instance"]))
    if errors:
        bad += 1
        print(f"case {i}: {json.dumps(c['instance'])}: {[e.message for e in errors]}")
print(f"validated {len(cases)} instances, {bad} invalid")
sys.exit(1 if bad else 0)
