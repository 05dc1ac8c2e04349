{{/*
The Serve config (serveConfigV2): the same document `dgserve build` writes for the same settings. Mirrors
dgserve/deploy/serve_config.py (build_serve_config, deployment_overrides) and
dgserve/routing/autoscaling.py (autoscaling_config); tests/test_helm.py checks that they agree.
*/}}
{{- define "dgserve.serveConfig" -}}
{{- $cfg := deepCopy .Values.dgserve -}}
{{- /* Helm drops null values of values.yaml; DeployConfig's optional fields are null, not missing. */ -}}
{{- $optional := dict "model" (list "served_name") "engine" (list "kv_cache_memory") "replicas" (list "autoscaling") "ingress" (list "request_timeout_s" "default_max_tokens" "max_tokens_limit" "max_prompt_tokens" "max_concurrent_requests") "auth" (list "api_keys_file" "api_keys_env") -}}
{{- range $section, $keys := $optional -}}
{{- $block := index $cfg $section -}}
{{- range $keys -}}
{{- if not (hasKey $block .) -}}
{{- $_ := set $block . nil -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $r := $cfg.replicas -}}
{{- $gang := int $r.ep_size -}}
{{- $model := dict "name" "ModelReplica" -}}
{{- if $r.autoscaling -}}
{{- $a := $r.autoscaling -}}
{{- $kwargs := dict "target_utilization" $a.target_utilization "smoothing_window_s" $a.smoothing_window_s "gang_size" $gang -}}
{{- $policy := dict "policy_function" "dgserve.routing.autoscaling:ThroughputAutoscalingPolicy" "policy_kwargs" $kwargs -}}
{{- $lookBack := maxf $a.smoothing_window_s (mulf 2 $a.metrics_interval_s) -}}
{{- $_ := set $model "autoscaling_config" (dict "min_replicas" (mul $a.min_replicas $gang) "max_replicas" (mul $a.max_replicas $gang) "upscale_delay_s" $a.upscale_delay_s "downscale_delay_s" $a.downscale_delay_s "metrics_interval_s" $a.metrics_interval_s "look_back_period_s" $lookBack "policy" $policy) -}}
{{- else -}}
{{- $_ := set $model "num_replicas" (mul $r.num_replicas $gang) -}}
{{- end -}}
{{- $_ := set $model "max_ongoing_requests" $r.max_ongoing_requests -}}
{{- $_ := set $model "health_check_period_s" $r.health_check_period_s -}}
{{- $_ := set $model "ray_actor_options" (dict "num_cpus" $r.num_cpus "num_gpus" $r.num_gpus) -}}
{{- $app := dict "name" $cfg.name "route_prefix" $cfg.route_prefix "import_path" "dgserve.routing.app:app_builder" "args" $cfg "deployments" (list $model) -}}
{{- $doc := dict "http_options" (dict "host" $cfg.http.host "port" $cfg.http.port) "applications" (list $app) -}}
{{- toYaml $doc -}}
{{- end -}}
