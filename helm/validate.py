"""Validates rendered Kubernetes manifests strictly (unknown fields fail); run by check.sh.

Usage: validate.py KUBERNETES_VERSION CONFIG_RS FILE...

Built-in kinds are checked with kubernetes-validate's strict schemas of that Kubernetes
version. The custom resources the chart can render (cert-manager Certificate and Issuer,
prometheus-operator ServiceMonitor) are checked against JSON schemas derived from the
cloudcoil models that are generated from those projects' CRDs, with
additionalProperties: false added wherever an object lists its properties. Any other kind
fails: nothing rendered goes unchecked. The coordinator.toml of every ConfigMap must parse
as TOML and use only keys of CoordinatorConfig (read from CONFIG_RS).
"""

import re
import sys
import tomllib

import jsonschema
import kubernetes_validate
import yaml


def strict(node):
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def custom_resource_schemas():
    from cloudcoil.models.cert_manager import v1 as cert_manager
    from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

    models = {
        ("cert-manager.io/v1", "Certificate"): cert_manager.Certificate,
        ("cert-manager.io/v1", "Issuer"): cert_manager.Issuer,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus_operator.ServiceMonitor,
    }
    return {key: strict(model.model_json_schema(by_alias=True)) for key, model in models.items()}


def coordinator_keys(config_rs):
    text = open(config_rs, encoding="utf-8").read()
    body = re.search(r"pub struct CoordinatorConfig \{(.*?)\n\}", text, re.S).group(1)
    return set(re.findall(r"^\s*pub (\w+):", body, re.M))


def main():
    version, config_rs, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    schemas = custom_resource_schemas()
    keys = coordinator_keys(config_rs)
    failures = 0
    checked = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            documents = [d for d in yaml.safe_load_all(f) if d]
        if not documents:
            print(f"FAIL {path}: no objects rendered")
            failures += 1
        for doc in documents:
            name = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            key = (doc.get("apiVersion"), doc.get("kind"))
            try:
                if key in schemas:
                    errors = sorted(
                        jsonschema.Draft202012Validator(schemas[key]).iter_errors(doc),
                        key=lambda e: list(e.path),
                    )
                    if errors:
                        raise ValueError("; ".join(
                            f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors))
                else:
                    kubernetes_validate.validate(doc, version, strict=True)
                if doc["kind"] == "ConfigMap" and "coordinator.toml" in doc.get("data", {}):
                    config = tomllib.loads(doc["data"]["coordinator.toml"])
                    unknown = set(config) - keys
                    if unknown:
                        raise ValueError(f"coordinator.toml has unknown keys {sorted(unknown)}")
            except kubernetes_validate.SchemaNotFoundError as e:
                print(f"FAIL {name}: {e.message}")
                failures += 1
            except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
                where = ".".join(map(str, e.path)) or "<root>"
                print(f"FAIL {name}: {where}: {e.message}")
                failures += 1
            except (ValueError, tomllib.TOMLDecodeError) as e:
                print(f"FAIL {name}: {e}")
                failures += 1
            else:
                checked += 1
                print(f"ok   {name}")
    print(f"{checked} objects valid against Kubernetes {version} (strict), {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
