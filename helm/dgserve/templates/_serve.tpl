{{/*
The Serve config (serveConfigV2): the application `dgserve build` writes for the same settings, without its
`deployments` options. Serve takes those from app_builder, which computes them from these args with the same
function that `dgserve build` uses (dgserve.routing.app.deployment_options); tests/test_helm.py checks both.
*/}}
{{- define "dgserve.serveConfig" -}}
{{- $cfg := deepCopy .Values.dgserve -}}
{{- /* Helm drops null values of values.yaml; DeployConfig's optional fields are null, not missing. */ -}}
{{- $optional := dict "model" (list "revision" "served_name") "engine" (list "kv_cache_memory" "max_waiting" "compile" "cuda_graphs") "replicas" (list "autoscaling") "ingress" (list "request_timeout_s" "default_max_tokens" "max_tokens_limit" "max_prompt_tokens" "max_concurrent_requests") "auth" (list "api_keys_file" "api_keys_env") -}}
{{- range $section, $keys := $optional -}}
{{- $block := index $cfg $section -}}
{{- range $keys -}}
{{- if not (hasKey $block .) -}}
{{- $_ := set $block . nil -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $app := dict "name" $cfg.name "route_prefix" $cfg.route_prefix "import_path" "dgserve.routing.app:app_builder" "args" $cfg -}}
{{- $doc := dict "http_options" (dict "host" $cfg.http.host "port" $cfg.http.port) "applications" (list $app) -}}
{{- toYaml $doc -}}
{{- end -}}
