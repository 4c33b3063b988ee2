# fish completion for forge.
# Generated from the click tree of forge and its loaded plugins. Do not edit by hand.
# Install: copy this file to ~/.config/fish/completions/forge.fish.

# Print the subcommands of subcommand path $argv[1].
function __forge_subcommands
    switch $argv[1]
        case ''
            printf '%s\n' cache completion edit eval finetune models plugins transfer zo
        case 'cache'
            printf '%s\n' gc info ls rm verify
        case 'edit'
            printf '%s\n' apply diff layers merge sae
        case 'edit sae'
            printf '%s\n' info train
        case 'eval'
            printf '%s\n' drift interpolate spectra
        case 'transfer'
            printf '%s\n' make-test-target
    end
end

# Print the number of values that option $argv[2] at subcommand path $argv[1] takes.
function __forge_option_nargs
    switch "$argv[1]|$argv[2]"
        case 'cache gc|--unused-days'
            echo 1
        case 'cache ls|--kind'
            echo 1
        case 'cache rm|--kind'
            echo 1
        case 'edit apply|--base'
            echo 1
        case 'edit apply|--k'
            echo 1
        case 'edit apply|--lambda'
            echo 1
        case 'edit apply|--output' 'edit apply|-o'
            echo 1
        case 'edit apply|--project'
            echo 1
        case 'edit apply|--sae'
            echo 1
        case 'edit apply|--scores'
            echo 1
        case 'edit apply|--seed'
            echo 1
        case 'edit apply|--select'
            echo 1
        case 'edit apply|--vector'
            echo 1
        case 'edit diff|--base'
            echo 1
        case 'edit diff|--output' 'edit diff|-o'
            echo 1
        case 'edit diff|--rank'
            echo 1
        case 'edit diff|--tuned'
            echo 1
        case 'edit layers|--column'
            echo 1
        case 'edit layers|--completion-template'
            echo 1
        case 'edit layers|--dtype'
            echo 1
        case 'edit layers|--eps'
            echo 1
        case 'edit layers|--format'
            echo 1
        case 'edit layers|--general-data'
            echo 1
        case 'edit layers|--general-format'
            echo 1
        case 'edit layers|--max-length'
            echo 1
        case 'edit layers|--min-rate'
            echo 1
        case 'edit layers|--model'
            echo 1
        case 'edit layers|--output' 'edit layers|-o'
            echo 1
        case 'edit layers|--plot'
            echo 1
        case 'edit layers|--prompt-template'
            echo 1
        case 'edit layers|--sae'
            echo 1
        case 'edit layers|--statistic'
            echo 1
        case 'edit layers|--task-data'
            echo 1
        case 'edit layers|--threads'
            echo 1
        case 'edit layers|--tokens'
            echo 1
        case 'edit layers|--top-m'
            echo 1
        case 'edit merge|--base'
            echo 1
        case 'edit merge|--lambda'
            echo 1
        case 'edit merge|--layers'
            echo 1
        case 'edit merge|--method'
            echo 1
        case 'edit merge|--modules'
            echo 1
        case 'edit merge|--output' 'edit merge|-o'
            echo 1
        case 'edit merge|--seed'
            echo 1
        case 'edit merge|--vector'
            echo 1
        case 'edit sae info|--model'
            echo 1
        case 'edit sae train|--batch-size'
            echo 1
        case 'edit sae train|--column'
            echo 1
        case 'edit sae train|--data'
            echo 1
        case 'edit sae train|--dead-tokens'
            echo 1
        case 'edit sae train|--dtype'
            echo 1
        case 'edit sae train|--epochs'
            echo 1
        case 'edit sae train|--expansion'
            echo 1
        case 'edit sae train|--format'
            echo 1
        case 'edit sae train|--k'
            echo 1
        case 'edit sae train|--layers'
            echo 1
        case 'edit sae train|--lr'
            echo 1
        case 'edit sae train|--max-length'
            echo 1
        case 'edit sae train|--model'
            echo 1
        case 'edit sae train|--output' 'edit sae train|-o'
            echo 1
        case 'edit sae train|--seed'
            echo 1
        case 'edit sae train|--steps'
            echo 1
        case 'edit sae train|--threads'
            echo 1
        case 'edit sae train|--tokens'
            echo 1
        case 'eval|--baseline'
            echo 1
        case 'eval|--batch-size'
            echo 1
        case 'eval|--data-dir'
            echo 1
        case 'eval|--dtype'
            echo 1
        case 'eval|--general'
            echo 1
        case 'eval|--limit'
            echo 1
        case 'eval|--model'
            echo 1
        case 'eval|--output' 'eval|-o'
            echo 1
        case 'eval|--plot'
            echo 1
        case 'eval|--seed'
            echo 1
        case 'eval|--target'
            echo 1
        case 'eval|--task-file'
            echo 1
        case 'eval drift|--baseline'
            echo 1
        case 'eval drift|--batch-size'
            echo 1
        case 'eval drift|--data'
            echo 1
        case 'eval drift|--data-dir'
            echo 1
        case 'eval drift|--dtype'
            echo 1
        case 'eval drift|--eps'
            echo 1
        case 'eval drift|--limit'
            echo 1
        case 'eval drift|--max-tokens'
            echo 1
        case 'eval drift|--model'
            echo 1
        case 'eval drift|--modules'
            echo 1
        case 'eval drift|--output' 'eval drift|-o'
            echo 1
        case 'eval drift|--plots'
            echo 1
        case 'eval drift|--seed'
            echo 1
        case 'eval drift|--task-file'
            echo 1
        case 'eval interpolate|--alphas'
            echo 1
        case 'eval interpolate|--baseline'
            echo 1
        case 'eval interpolate|--batch-size'
            echo 1
        case 'eval interpolate|--data-dir'
            echo 1
        case 'eval interpolate|--dtype'
            echo 1
        case 'eval interpolate|--general'
            echo 1
        case 'eval interpolate|--limit'
            echo 1
        case 'eval interpolate|--model'
            echo 1
        case 'eval interpolate|--oft-scale'
            echo 1
        case 'eval interpolate|--output' 'eval interpolate|-o'
            echo 1
        case 'eval interpolate|--plots'
            echo 1
        case 'eval interpolate|--seed'
            echo 1
        case 'eval interpolate|--target'
            echo 1
        case 'eval interpolate|--task-file'
            echo 1
        case 'eval interpolate|--tolerance'
            echo 1
        case 'eval interpolate|--write-best'
            echo 1
        case 'eval spectra|--base'
            echo 1
        case 'eval spectra|--model'
            echo 1
        case 'eval spectra|--modules'
            echo 1
        case 'eval spectra|--normalize'
            echo 1
        case 'eval spectra|--output' 'eval spectra|-o'
            echo 1
        case 'eval spectra|--padding'
            echo 1
        case 'eval spectra|--plots'
            echo 1
        case 'eval spectra|--window'
            echo 1
        case 'finetune|--alpha'
            echo 1
        case 'finetune|--batch-size'
            echo 1
        case 'finetune|--block-size'
            echo 1
        case 'finetune|--budget'
            echo 1
        case 'finetune|--column'
            echo 1
        case 'finetune|--completion-template'
            echo 1
        case 'finetune|--data'
            echo 1
        case 'finetune|--dropout'
            echo 1
        case 'finetune|--epochs'
            echo 1
        case 'finetune|--eval-data'
            echo 1
        case 'finetune|--eval-every'
            echo 1
        case 'finetune|--eval-split'
            echo 1
        case 'finetune|--format'
            echo 1
        case 'finetune|--grad-accum'
            echo 1
        case 'finetune|--limit'
            echo 1
        case 'finetune|--lr'
            echo 1
        case 'finetune|--max-grad-norm'
            echo 1
        case 'finetune|--max-length'
            echo 1
        case 'finetune|--method'
            echo 1
        case 'finetune|--model'
            echo 1
        case 'finetune|--output' 'finetune|-o'
            echo 1
        case 'finetune|--overlong'
            echo 1
        case 'finetune|--prompt-template'
            echo 1
        case 'finetune|--rank'
            echo 1
        case 'finetune|--save-every'
            echo 1
        case 'finetune|--schedule'
            echo 1
        case 'finetune|--seed'
            echo 1
        case 'finetune|--steps'
            echo 1
        case 'finetune|--target-modules'
            echo 1
        case 'finetune|--threads'
            echo 1
        case 'finetune|--warmup-steps'
            echo 1
        case 'transfer|--align'
            echo 1
        case 'transfer|--alpha'
            echo 1
        case 'transfer|--alpha-data'
            echo 1
        case 'transfer|--alpha-grid'
            echo 1
        case 'transfer|--batch-size'
            echo 1
        case 'transfer|--calib'
            echo 1
        case 'transfer|--calib-tokens'
            echo 1
        case 'transfer|--dtype'
            echo 1
        case 'transfer|--layer-map'
            echo 1
        case 'transfer|--max-length'
            echo 1
        case 'transfer|--output' 'transfer|-o'
            echo 1
        case 'transfer|--source-base'
            echo 1
        case 'transfer|--source-tuned'
            echo 1
        case 'transfer|--target-base'
            echo 1
        case 'transfer|--vector'
            echo 1
        case 'transfer make-test-target|--model'
            echo 1
        case 'transfer make-test-target|--output' 'transfer make-test-target|-o'
            echo 1
        case 'transfer make-test-target|--seed'
            echo 1
        case 'zo|--alpha'
            echo 1
        case 'zo|--backend'
            echo 1
        case 'zo|--batch-size'
            echo 1
        case 'zo|--column'
            echo 1
        case 'zo|--completion-template'
            echo 1
        case 'zo|--data'
            echo 1
        case 'zo|--dtype'
            echo 1
        case 'zo|--eps'
            echo 1
        case 'zo|--eval-batch-size'
            echo 1
        case 'zo|--eval-data'
            echo 1
        case 'zo|--eval-every'
            echo 1
        case 'zo|--eval-limit'
            echo 1
        case 'zo|--format'
            echo 1
        case 'zo|--label-field'
            echo 1
        case 'zo|--limit'
            echo 1
        case 'zo|--lr'
            echo 1
        case 'zo|--max-length'
            echo 1
        case 'zo|--method'
            echo 1
        case 'zo|--model'
            echo 1
        case 'zo|--momentum'
            echo 1
        case 'zo|--nu'
            echo 1
        case 'zo|--output' 'zo|-o'
            echo 1
        case 'zo|--perturbation'
            echo 1
        case 'zo|--prompt-template'
            echo 1
        case 'zo|--queries'
            echo 1
        case 'zo|--rank'
            echo 1
        case 'zo|--save-every'
            echo 1
        case 'zo|--seed'
            echo 1
        case 'zo|--single-token'
            echo 1
        case 'zo|--steps'
            echo 1
        case 'zo|--target-modules'
            echo 1
        case 'zo|--template'
            echo 1
        case 'zo|--threads'
            echo 1
        case 'zo|--verbalizers'
            echo 1
        case 'zo|--weight-decay'
            echo 1
        case '*'
            echo 0
    end
end

# Print the subcommand path of the command line being completed, e.g. "cache gc".
function __forge_path
    set -l path ''
    set -l skip 0
    for token in (commandline -opc)[2..-1]
        if test $skip -gt 0
            set skip (math $skip - 1)
        else if string match -q -- '-*' $token
            set skip (__forge_option_nargs "$path" $token)
        else if contains -- $token (__forge_subcommands "$path")
            set path (string trim -- "$path $token")
        end
    end
    echo $path
end

# Succeed when the command line being completed is at the subcommand path given as arguments.
function __forge_at
    set -l path (__forge_path)
    test "$path" = "$argv"
end

complete -c forge -f

# forge
complete -c forge -n '__forge_at' -a 'cache' -d 'Manage the shared tensor cache ($FORGE_CACHE, else ~/.cache/llmforge on Linux)'
complete -c forge -n '__forge_at' -a 'completion' -d 'Print the completion script for SHELL, built from the commands loaded now'
complete -c forge -n '__forge_at' -a 'edit' -d 'Edit models with task vectors: compute them, merge them, and choose layers...'
complete -c forge -n '__forge_at' -a 'eval' -d 'Evaluate models on target and general tasks and report scores, standard...'
complete -c forge -n '__forge_at' -a 'finetune' -d 'Fine-tune a model with a PEFT method (or fully) on a data file and write the...'
complete -c forge -n '__forge_at' -a 'models' -d 'List the built-in models, whether their package is installed, and whether a...'
complete -c forge -n '__forge_at' -a 'plugins' -d 'List the loaded plugins with their versions and hooks, and the plugins that...'
complete -c forge -n '__forge_at' -a 'transfer' -d 'Move a task vector from one base model to another without training'
complete -c forge -n '__forge_at' -a 'zo' -d 'Fine-tune a model without backpropagation: zeroth-order (MeZO, LoZO) steps...'
complete -c forge -n '__forge_at' -l allow-pickle -d 'Allow model weights stored as pickle files (.bin, .pt); they are read with...'
complete -c forge -n '__forge_at' -l debug -d 'Show the full traceback of an error'
complete -c forge -n '__forge_at' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at' -l version -d 'Show the version and exit'

# forge cache
complete -c forge -n '__forge_at cache' -a 'gc' -d 'Remove blobs no entry uses and leftovers of interrupted writes older than an...'
complete -c forge -n '__forge_at cache' -a 'info' -d 'Show the full record of the entries whose key digests start with KEYS'
complete -c forge -n '__forge_at cache' -a 'ls' -d 'List cache entries with their kind, size, creation time and last use'
complete -c forge -n '__forge_at cache' -a 'rm' -d 'Remove the entries whose key digests start with KEYS (or --kind, or --all)...'
complete -c forge -n '__forge_at cache' -a 'verify' -d 'Check every entry against its content digest; exit with status 1 if any is...'
complete -c forge -n '__forge_at cache' -l help -s h -d 'Show this message and exit'

# forge cache gc
complete -c forge -n '__forge_at cache gc' -l dry-run -d 'Only list what would be removed'
complete -c forge -n '__forge_at cache gc' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at cache gc' -l json -d 'Print a JSON document instead of text'
complete -c forge -n '__forge_at cache gc' -l unused-days -x -d 'Also remove entries not used for this many days'

# forge cache info
complete -c forge -n '__forge_at cache info' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at cache info' -l json -d 'Print a JSON document instead of text'

# forge cache ls
complete -c forge -n '__forge_at cache ls' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at cache ls' -l json -d 'Print a JSON document instead of a table'
complete -c forge -n '__forge_at cache ls' -l kind -x -d 'Show only entries of this kind (for example converted-model, eval-score)'

# forge cache rm
complete -c forge -n '__forge_at cache rm' -l all -d 'Remove every entry'
complete -c forge -n '__forge_at cache rm' -l dry-run -d 'Only list what would be removed'
complete -c forge -n '__forge_at cache rm' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at cache rm' -l json -d 'Print a JSON document instead of text'
complete -c forge -n '__forge_at cache rm' -l kind -x -d 'Remove every entry of this kind'

# forge cache verify
complete -c forge -n '__forge_at cache verify' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at cache verify' -l json -d 'Print a JSON document instead of text'

# forge completion
complete -c forge -n '__forge_at completion' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at completion' -a 'bash fish zsh'

# forge edit
complete -c forge -n '__forge_at edit' -a 'apply' -d 'Add a task vector to chosen decoder layers of the base only, and write an HF...'
complete -c forge -n '__forge_at edit' -a 'diff' -d 'Write the task vector tuned minus base as a safetensors file'
complete -c forge -n '__forge_at edit' -a 'layers' -d 'Rank decoder layers by how task-specific their SAE features are'
complete -c forge -n '__forge_at edit' -a 'merge' -d 'Merge task vectors into a base model and write the result as an HF model...'
complete -c forge -n '__forge_at edit' -a 'sae' -d 'Train and inspect sparse autoencoders on the residual stream, stored in the...'
complete -c forge -n '__forge_at edit' -l help -s h -d 'Show this message and exit'

# forge edit apply
complete -c forge -n '__forge_at edit apply' -l base -x -d 'Base model reference that the task vector was computed against'
complete -c forge -n '__forge_at edit apply' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at edit apply' -l json -d 'Print the run record as one JSON document on stdout'
complete -c forge -n '__forge_at edit apply' -l k -x -d 'Number of layers for top-k, bottom-k and random-k'
complete -c forge -n '__forge_at edit apply' -l lambda -x -d 'Factor applied to the task vector; 1 adds the raw vector'
complete -c forge -n '__forge_at edit apply' -l output -s o -x -a '(__fish_complete_directories)' -d 'HF model directory to write, with forge_run.json'
complete -c forge -n '__forge_at edit apply' -l overwrite -d 'Replace an existing output directory written by forge'
complete -c forge -n '__forge_at edit apply' -l project -x -a 'sae' -d 'Project tau onto the span of each chosen layer\'s top task features (needs...'
complete -c forge -n '__forge_at edit apply' -l quiet -d 'No progress bars'
complete -c forge -n '__forge_at edit apply' -l sae -x -a '(__fish_complete_directories)' -d 'SAE directory the scores were computed with; used by --project sae'
complete -c forge -n '__forge_at edit apply' -l scores -r -F -d 'Scores file from `forge edit layers -o`; needed by top-k, bottom-k and --project'
complete -c forge -n '__forge_at edit apply' -l seed -x -d 'Seed of the random-k draw'
complete -c forge -n '__forge_at edit apply' -l select -x -d 'Layers to edit: the k best or worst scored layers, k random layers, the...'
complete -c forge -n '__forge_at edit apply' -l vector -r -F -d 'Task vector file from `forge edit diff`'

# forge edit diff
complete -c forge -n '__forge_at edit diff' -l base -x -d 'Base model reference: a built-in name, HF directory or .gguf file'
complete -c forge -n '__forge_at edit diff' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at edit diff' -l json -d 'Print the summary, with per-tensor energy, as one JSON document'
complete -c forge -n '__forge_at edit diff' -l output -s o -r -F -d 'Task vector file to write (.safetensors)'
complete -c forge -n '__forge_at edit diff' -l overwrite -d 'Replace an existing output file'
complete -c forge -n '__forge_at edit diff' -l quiet -d 'No progress bars'
complete -c forge -n '__forge_at edit diff' -l rank -x -d 'Store each 2-D update as its rank-R truncated SVD; 1-D updates stay dense'
complete -c forge -n '__forge_at edit diff' -l tuned -x -d 'Fine-tuned model reference: an HF directory, .gguf file, built-in name or...'

# forge edit layers
complete -c forge -n '__forge_at edit layers' -l column -x -d 'Read the task format\'s FIELD from the record field NAME (repeatable)'
complete -c forge -n '__forge_at edit layers' -l completion-template -x -d 'Task completion template with {field} placeholders, e.g'
complete -c forge -n '__forge_at edit layers' -l dtype -x -a 'bf16 fp32' -d 'Dtype of the model forward'
complete -c forge -n '__forge_at edit layers' -l eps -x -d 'eps in the denominator of s_j'
complete -c forge -n '__forge_at edit layers' -l format -x -a 'auto chat instruction prompt-completion text' -d 'Record format of --task-data (as in forge finetune); each record\'s prompt...'
complete -c forge -n '__forge_at edit layers' -l general-data -x -d 'General text to compare with, read with --general-format'
complete -c forge -n '__forge_at edit layers' -l general-format -x -a 'auto chat instruction prompt-completion text' -d 'Record format of --general-data'
complete -c forge -n '__forge_at edit layers' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at edit layers' -l json -d 'Print the full record, with each layer\'s top features, as JSON'
complete -c forge -n '__forge_at edit layers' -l keep-bos -l skip-bos -d 'Leave out the activation of a leading BOS token, as `forge edit sae train` does'
complete -c forge -n '__forge_at edit layers' -l max-length -x -d 'Tokens per sequence; a longer text is split into consecutive windows of this...'
complete -c forge -n '__forge_at edit layers' -l min-rate -x -d 'Leave out features that fire on less than this fraction of the task tokens...'
complete -c forge -n '__forge_at edit layers' -l model -r -F -a 'gemma3-270m smollm2-135m' -d 'Model reference: a built-in name, HF directory or .gguf file'
complete -c forge -n '__forge_at edit layers' -l output -s o -r -F -d 'Write the scores as JSON, the file `forge edit apply --scores` reads'
complete -c forge -n '__forge_at edit layers' -l overwrite -d 'Replace existing -o and --plot files'
complete -c forge -n '__forge_at edit layers' -l plot -r -F -d 'Write a bar chart of the layer scores as PNG'
complete -c forge -n '__forge_at edit layers' -l prompt-template -x -d 'Task prompt template with {field} placeholders, e.g'
complete -c forge -n '__forge_at edit layers' -l quiet -d 'No progress bars'
complete -c forge -n '__forge_at edit layers' -l sae -x -a '(__fish_complete_directories)' -d 'SAE directory from `forge edit sae train` (or SAELens directories); every...'
complete -c forge -n '__forge_at edit layers' -l statistic -x -a 'mean rate' -d 'mu per feature: the mean activation over tokens, or the fraction of tokens...'
complete -c forge -n '__forge_at edit layers' -l task-data -x -d 'Task text: a .jsonl/.json/.csv/.tsv/.txt file or demo:NAME; a .txt file...'
complete -c forge -n '__forge_at edit layers' -l threads -x -d 'CPU threads for torch (default: one per core)'
complete -c forge -n '__forge_at edit layers' -l tokens -x -d 'Token budget per data set: activations collected on the task text and on the...'
complete -c forge -n '__forge_at edit layers' -l top-m -x -d 'A layer\'s score is the mean specificity s_j of its top-m features'

# forge edit merge
complete -c forge -n '__forge_at edit merge' -l base -x -d 'Base model reference that the task vectors were computed against'
complete -c forge -n '__forge_at edit merge' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at edit merge' -l json -d 'Print the run record as one JSON document on stdout'
complete -c forge -n '__forge_at edit merge' -l lambda -x -d 'Factor applied to the combined update before it is added to the base'
complete -c forge -n '__forge_at edit merge' -l layers -x -d 'Update only these decoder layers, e.g'
complete -c forge -n '__forge_at edit merge' -l method -x -d 'Merge method: task_arithmetic, ties, dare_linear, dare_ties...'
complete -c forge -n '__forge_at edit merge' -l modules -x -d 'Update only tensors of these modules, e.g'
complete -c forge -n '__forge_at edit merge' -l no-normalize -l normalize -d 'Divide the combined update by the sum of the weights that took part'
complete -c forge -n '__forge_at edit merge' -l output -s o -x -a '(__fish_complete_directories)' -d 'HF model directory to write, with forge_run.json'
complete -c forge -n '__forge_at edit merge' -l overwrite -d 'Replace an existing output directory'
complete -c forge -n '__forge_at edit merge' -l quiet -d 'No progress bars'
complete -c forge -n '__forge_at edit merge' -l seed -x -d 'Seed of the random pruning of dare_linear and dare_ties'
complete -c forge -n '__forge_at edit merge' -l vector -x -d 'A task vector file from `forge edit diff`, with its weight (default 1) and...'

# forge edit sae
complete -c forge -n '__forge_at edit sae' -a 'info' -d 'Print each SAE\'s layer, hook, sizes and recorded quality (explained...'
complete -c forge -n '__forge_at edit sae' -a 'train' -d 'Train one TopK SAE per decoder layer on residual-stream activations...'
complete -c forge -n '__forge_at edit sae' -l help -s h -d 'Show this message and exit'

# forge edit sae info
complete -c forge -n '__forge_at edit sae info' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at edit sae info' -l json -d 'Print one JSON document on stdout'
complete -c forge -n '__forge_at edit sae info' -l model -r -F -a 'gemma3-270m smollm2-135m' -d 'Check that every SAE fits this model: d_in equals its hidden size and the...'
complete -c forge -n '__forge_at edit sae info' -F

# forge edit sae train
complete -c forge -n '__forge_at edit sae train' -l batch-size -x -d 'Tokens per Adam step'
complete -c forge -n '__forge_at edit sae train' -l column -x -d 'Read the format\'s FIELD from the record field NAME (repeatable)'
complete -c forge -n '__forge_at edit sae train' -l data -x -d 'Text to collect activations on: a .jsonl/.json/.csv/.tsv/.txt file or demo:NAME'
complete -c forge -n '__forge_at edit sae train' -l dead-tokens -x -d 'A feature that has not fired for this many training tokens is dead and gets...'
complete -c forge -n '__forge_at edit sae train' -l dtype -x -a 'bf16 fp32' -d 'Dtype of the model forward and of the SAE encoder product; SAE weights and...'
complete -c forge -n '__forge_at edit sae train' -l epochs -x -d 'Passes over the training tokens per layer (2 reach an explained variance...'
complete -c forge -n '__forge_at edit sae train' -l expansion -x -d 'Dictionary size as a multiple of the hidden size'
complete -c forge -n '__forge_at edit sae train' -l format -x -a 'auto chat instruction prompt-completion text' -d 'Record format (as in forge finetune); each record\'s prompt and completion...'
complete -c forge -n '__forge_at edit sae train' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at edit sae train' -l json -d 'Print the summary as one JSON document on stdout'
complete -c forge -n '__forge_at edit sae train' -l k -x -d 'Features active per token (TopK)'
complete -c forge -n '__forge_at edit sae train' -l keep-bos -l skip-bos -d 'Leave out the activation of a leading BOS token, whose norm is far above the...'
complete -c forge -n '__forge_at edit sae train' -l layers -x -d 'Decoder layers: all, 0,4,8 or ranges such as 2-5'
complete -c forge -n '__forge_at edit sae train' -l lr -x -d 'Adam learning rate'
complete -c forge -n '__forge_at edit sae train' -l max-length -x -d 'Tokens per sequence; a longer text is split into consecutive windows of this...'
complete -c forge -n '__forge_at edit sae train' -l model -r -F -a 'gemma3-270m smollm2-135m' -d 'Model reference: a built-in name, HF directory, .gguf file or adapter'
complete -c forge -n '__forge_at edit sae train' -l output -s o -r -F -d 'Directory to write: one blocks.L.hook_resid_post/ SAELens directory per...'
complete -c forge -n '__forge_at edit sae train' -l overwrite -d 'Replace an existing output directory written by forge'
complete -c forge -n '__forge_at edit sae train' -l quiet -d 'No progress bars'
complete -c forge -n '__forge_at edit sae train' -l seed -x -d 'Seed of the held-out split, batch order and initialisation'
complete -c forge -n '__forge_at edit sae train' -l steps -x -d 'Adam steps per layer; overrides --epochs'
complete -c forge -n '__forge_at edit sae train' -l threads -x -d 'CPU threads for torch (default: one per core)'
complete -c forge -n '__forge_at edit sae train' -l tokens -x -d 'Token budget: activations collected per layer (5% are held out for explained...'

# forge eval
complete -c forge -n '__forge_at eval' -a 'drift' -d 'Compare the activations of fine-tuned models with their base model, per...'
complete -c forge -n '__forge_at eval' -a 'interpolate' -d 'Score a fine-tune along the path from its base model, and name the best...'
complete -c forge -n '__forge_at eval' -a 'spectra' -d 'Measure how each updated linear weight moved against the base weight\'s...'
complete -c forge -n '__forge_at eval' -l baseline -x -d 'Reference model; the report adds deltas (model minus baseline)'
complete -c forge -n '__forge_at eval' -l batch-size -x -d 'Sequences per forward pass'
complete -c forge -n '__forge_at eval' -l data-dir -x -a '(__fish_complete_directories)' -d 'Directory of the public data sets that specs name as {data_dir} [env...'
complete -c forge -n '__forge_at eval' -l dtype -x -a 'bfloat16 float32' -d 'Weight and activation dtype for scoring'
complete -c forge -n '__forge_at eval' -l general -x -d 'General-capability tasks (stability)'
complete -c forge -n '__forge_at eval' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at eval' -l json -d 'Print the JSON report instead of the table'
complete -c forge -n '__forge_at eval' -l limit -x -d 'Score N examples per task, drawn with --seed (perplexity: the first N windows)'
complete -c forge -n '__forge_at eval' -l list-tasks -d 'List the available tasks and suites and exit'
complete -c forge -n '__forge_at eval' -l model -x -d 'Model to evaluate (built-in name, HF dir, .gguf file or PEFT adapter dir)...'
complete -c forge -n '__forge_at eval' -l no-cache -d 'Recompute every score; neither read nor write cached scores'
complete -c forge -n '__forge_at eval' -l output -s o -r -F -d 'Write the JSON report to this file, and the Pareto plot beside it as...'
complete -c forge -n '__forge_at eval' -l plot -r -F -d 'Write the PNG plot of target against general score, Pareto frontier marked...'
complete -c forge -n '__forge_at eval' -l quiet -d 'No progress bars or log lines on stderr'
complete -c forge -n '__forge_at eval' -l seed -x -d 'Seed that draws the --limit sample'
complete -c forge -n '__forge_at eval' -l target -x -d 'Target tasks (plasticity)'
complete -c forge -n '__forge_at eval' -l task-file -r -F -d 'YAML or JSON task spec to add; repeatable'

# forge eval drift
complete -c forge -n '__forge_at eval drift' -l baseline -x -d 'The base model the fine-tunes started from'
complete -c forge -n '__forge_at eval drift' -l batch-size -x -d 'Prompts per forward pass'
complete -c forge -n '__forge_at eval drift' -l data -x -d 'Eval task name (its prompts), or a JSONL/JSON/CSV/TXT file or demo:NAME with...'
complete -c forge -n '__forge_at eval drift' -l data-dir -x -a '(__fish_complete_directories)' -d 'Directory of the public data sets that task specs name as {data_dir} [env...'
complete -c forge -n '__forge_at eval drift' -l dtype -x -a 'bfloat16 float32' -d 'Dtype the models run in; captured activations are stored as float32 either way'
complete -c forge -n '__forge_at eval drift' -l eps -x -d 'Added to E||W0 h||^2 in the CSD_rel denominator'
complete -c forge -n '__forge_at eval drift' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at eval drift' -l json -d 'Print the JSON report instead of the table'
complete -c forge -n '__forge_at eval drift' -l limit -x -d 'Use N prompts drawn with --seed'
complete -c forge -n '__forge_at eval drift' -l max-tokens -x -d 'Cap on the tokens captured, over all prompts; memory and cache size grow...'
complete -c forge -n '__forge_at eval drift' -l model -x -d 'Fine-tuned model (PEFT adapter dir or HF dir) to compare with the baseline...'
complete -c forge -n '__forge_at eval drift' -l modules -x -d 'Comma list of linear module names to compare (e.g'
complete -c forge -n '__forge_at eval drift' -l output -s o -r -F -d 'Write the JSON report (and the plots beside it)'
complete -c forge -n '__forge_at eval drift' -l plots -x -a '(__fish_complete_directories)' -d 'Write the PNG plots here (default: beside the -o report; none without -o or...'
complete -c forge -n '__forge_at eval drift' -l quiet -d 'No progress bars or log lines on stderr'
complete -c forge -n '__forge_at eval drift' -l seed -x -d 'Seed that draws the --limit sample'
complete -c forge -n '__forge_at eval drift' -l task-file -r -F -d 'YAML or JSON task spec that --data may name; repeatable'

# forge eval interpolate
complete -c forge -n '__forge_at eval interpolate' -l alphas -x -d 'Comma list of path positions a in [0, 1] (0 is the base, 1 the tuned model)...'
complete -c forge -n '__forge_at eval interpolate' -l baseline -x -d 'The model it was fine-tuned from (a=0)'
complete -c forge -n '__forge_at eval interpolate' -l batch-size -x -d 'Sequences per forward pass'
complete -c forge -n '__forge_at eval interpolate' -l checkpoints -d 'Also rewind: score the base, every checkpoints/step-NNNNNN the run kept...'
complete -c forge -n '__forge_at eval interpolate' -l data-dir -x -a '(__fish_complete_directories)' -d 'Directory of the public data sets that specs name as {data_dir} [env...'
complete -c forge -n '__forge_at eval interpolate' -l dtype -x -a 'bfloat16 float32' -d 'Weight and activation dtype for scoring'
complete -c forge -n '__forge_at eval interpolate' -l general -x -d 'General-capability tasks (stability), comma list'
complete -c forge -n '__forge_at eval interpolate' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at eval interpolate' -l json -d 'Print the JSON report instead of the table'
complete -c forge -n '__forge_at eval interpolate' -l limit -x -d 'Score N examples per task, drawn with --seed (perplexity: the first N windows)'
complete -c forge -n '__forge_at eval interpolate' -l model -x -d 'The fine-tuned model: a PEFT adapter dir or a model dir (e.g'
complete -c forge -n '__forge_at eval interpolate' -l no-cache -d 'Recompute every score; neither read nor write cached scores'
complete -c forge -n '__forge_at eval interpolate' -l oft-scale -x -a 'linear sqrt' -d 'How a scales an OFT adapter\'s skew-symmetric generator Q: by sqrt(a), or by a'
complete -c forge -n '__forge_at eval interpolate' -l output -s o -r -F -d 'Write the JSON report to this file (as everywhere in `forge eval`); the plot...'
complete -c forge -n '__forge_at eval interpolate' -l overwrite -d 'Replace an existing --write-best directory written by forge'
complete -c forge -n '__forge_at eval interpolate' -l plots -x -a '(__fish_complete_directories)' -d 'Write the plot (interpolate.png) to this directory instead of beside --output'
complete -c forge -n '__forge_at eval interpolate' -l quiet -d 'No progress bars or log lines on stderr'
complete -c forge -n '__forge_at eval interpolate' -l seed -x -d 'Seed that draws the --limit sample'
complete -c forge -n '__forge_at eval interpolate' -l target -x -d 'Target tasks (plasticity), comma list'
complete -c forge -n '__forge_at eval interpolate' -l task-file -r -F -d 'YAML or JSON task spec to add; repeatable'
complete -c forge -n '__forge_at eval interpolate' -l tolerance -x -d 'Best trade-off: the highest general score among points whose target score is...'
complete -c forge -n '__forge_at eval interpolate' -l write-best -x -a '(__fish_complete_directories)' -d 'Write the best trade-off point\'s model to DIR: a copied adapter for an...'

# forge eval spectra
complete -c forge -n '__forge_at eval spectra' -l base -x -d 'Base model the updates are measured against'
complete -c forge -n '__forge_at eval spectra' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at eval spectra' -l json -d 'Print the JSON report instead of the table'
complete -c forge -n '__forge_at eval spectra' -l model -x -d 'Fine-tuned model: PEFT adapter dir, HF model dir (full fine-tune or merged)...'
complete -c forge -n '__forge_at eval spectra' -l modules -x -d 'Comma list of module types to analyse (e.g'
complete -c forge -n '__forge_at eval spectra' -l normalize -x -a 'mean none' -d 'Divide dP and E by their mean before the smoothness is taken (mean), or keep...'
complete -c forge -n '__forge_at eval spectra' -l output -s o -r -F -d 'Write the JSON report to this file; the PNG plots go beside it unless...'
complete -c forge -n '__forge_at eval spectra' -l padding -x -a 'edge reflect symmetric' -d 'How the moving average extends dP and E at their ends (as numpy.pad names...'
complete -c forge -n '__forge_at eval spectra' -l plots -x -a '(__fish_complete_directories)' -d 'Write spectra-profiles.png and spectra-layers.png into this directory'
complete -c forge -n '__forge_at eval spectra' -l quiet -d 'No progress bar on stderr'
complete -c forge -n '__forge_at eval spectra' -l window -x -d 'Width of the moving average in the spectral smoothness (odd number of...'

# forge finetune
complete -c forge -n '__forge_at finetune' -l alpha -x -d 'LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) for rslora)...'
complete -c forge -n '__forge_at finetune' -l batch-size -x -d 'Examples per micro-batch'
complete -c forge -n '__forge_at finetune' -l bf16 -l no-bf16 -d 'Run the model and trainable weights in bf16 with fp32 master weights...'
complete -c forge -n '__forge_at finetune' -l block-size -x -d 'Block size of OFT (default 32), BOFT (8) and MiSS (64)'
complete -c forge -n '__forge_at finetune' -l budget -x -d 'Trainable-parameter budget such as 2.4M, 500k or 1e6; chooses --rank or...'
complete -c forge -n '__forge_at finetune' -l column -x -d 'Read the format\'s FIELD from the record field NAME, e.g'
complete -c forge -n '__forge_at finetune' -l completion-template -x -d 'Completion built from record fields, e.g'
complete -c forge -n '__forge_at finetune' -l data -x -d 'Training data: a .jsonl/.json/.csv/.tsv/.txt file, or demo:NAME (not needed...'
complete -c forge -n '__forge_at finetune' -l dropout -x -d 'Adapter dropout probability; default 0.05 for the LoRA family, else 0'
complete -c forge -n '__forge_at finetune' -l dry-run -d 'Print the method, chosen size, exact trainable count and a memory estimate...'
complete -c forge -n '__forge_at finetune' -l epochs -x -d 'Number of passes over the data; exclusive with --steps'
complete -c forge -n '__forge_at finetune' -l eval-data -x -d 'Held-out data file (same format options as --data); exclusive with --eval-split'
complete -c forge -n '__forge_at finetune' -l eval-every -x -d 'Compute the held-out loss every N steps (always after the last step when...'
complete -c forge -n '__forge_at finetune' -l eval-split -x -d 'Fraction of the examples held out (chosen with --seed) for a held-out loss...'
complete -c forge -n '__forge_at finetune' -l format -x -a 'auto chat instruction prompt-completion text' -d 'Record format; auto detects it from the field names'
complete -c forge -n '__forge_at finetune' -l grad-accum -x -d 'Micro-batches per optimizer step'
complete -c forge -n '__forge_at finetune' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at finetune' -l json -d 'Print the run summary (or the dry-run plan, or the method list) as one JSON...'
complete -c forge -n '__forge_at finetune' -l limit -x -d 'Use only the first N records of the data file'
complete -c forge -n '__forge_at finetune' -l list-methods -d 'List the methods with their options and defaults, and exit'
complete -c forge -n '__forge_at finetune' -l lr -x -d 'Peak learning rate of AdamW (default 2e-4, 5e-5 for --method full)'
complete -c forge -n '__forge_at finetune' -l max-grad-norm -x -d 'Gradient clipping threshold (L2 norm)'
complete -c forge -n '__forge_at finetune' -l max-length -x -d 'Maximum tokens per example (prompt, completion and EOS); --overlong sets...'
complete -c forge -n '__forge_at finetune' -l merge -d 'Also write the merged model (base weights plus the adapter\'s update) as an...'
complete -c forge -n '__forge_at finetune' -l method -x -a 'adalora boft dora full ia3 lora milora miss oft pissa rslora vera' -d 'Fine-tuning method; --list-methods shows each one\'s options and defaults'
complete -c forge -n '__forge_at finetune' -l model -r -F -a 'gemma3-270m smollm2-135m' -d 'Base model reference: a built-in name, HF directory or .gguf file (required)'
complete -c forge -n '__forge_at finetune' -l no-packing -l packing -d 'Pack each micro-batch into one row of real tokens with attention kept inside...'
complete -c forge -n '__forge_at finetune' -l output -s o -r -F -d 'Directory to write: a PEFT adapter, or an HF model for --method full; plus...'
complete -c forge -n '__forge_at finetune' -l overlong -x -a 'reject truncate' -d 'Examples longer than --max-length: truncate cuts them (with a warning and...'
complete -c forge -n '__forge_at finetune' -l overwrite -d 'Replace an existing output directory'
complete -c forge -n '__forge_at finetune' -l prompt-template -x -d 'Prompt built from record fields, e.g'
complete -c forge -n '__forge_at finetune' -l quiet -d 'No progress bar and no summary on stderr'
complete -c forge -n '__forge_at finetune' -l rank -x -d 'Rank r (LoRA family, AdaLoRA target rank, VeRA); default 8, VeRA 256'
complete -c forge -n '__forge_at finetune' -l resume -d 'Continue an unfinished run from its last checkpoint in OUTPUT.partial/, the...'
complete -c forge -n '__forge_at finetune' -l save-every -x -d 'Save a checkpoint every N steps: the adapter (or, for --method full, the...'
complete -c forge -n '__forge_at finetune' -l schedule -x -a 'constant cosine' -d 'Learning-rate schedule after warmup'
complete -c forge -n '__forge_at finetune' -l seed -x -d 'Seed for the adapter init, data order and dropout'
complete -c forge -n '__forge_at finetune' -l steps -x -d 'Number of optimizer steps (default: one epoch)'
complete -c forge -n '__forge_at finetune' -l target-modules -x -d 'Linear modules to adapt: all-linear (default), or comma-separated names such...'
complete -c forge -n '__forge_at finetune' -l threads -x -d 'CPU threads for torch (default: torch\'s choice, one per core)'
complete -c forge -n '__forge_at finetune' -l warmup-steps -x -d 'Linear warmup length in steps (default: 5% of the run, at most 100)'

# forge models
complete -c forge -n '__forge_at models' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at models' -l json -d 'Print a JSON document instead of a table'

# forge plugins
complete -c forge -n '__forge_at plugins' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at plugins' -l json -d 'Print a JSON document instead of a table'

# forge transfer
complete -c forge -n '__forge_at transfer' -a 'make-test-target' -d 'Write an exact re-parameterisation of a Llama-style model: same logits...'
complete -c forge -n '__forge_at transfer' -l align -x -a 'activations bico naive' -d 'How the maps are estimated: input activations with output gradients (bico)...'
complete -c forge -n '__forge_at transfer' -l alpha -x -d 'Factor applied to the transported vector'
complete -c forge -n '__forge_at transfer' -l alpha-data -x -d 'Held-out data for --alpha-grid, in any format forge finetune reads; keep it...'
complete -c forge -n '__forge_at transfer' -l alpha-grid -x -d 'Choose alpha from these values (0 is always scored) by the lowest loss on...'
complete -c forge -n '__forge_at transfer' -l batch-size -x -d 'Calibration examples per forward-backward pass'
complete -c forge -n '__forge_at transfer' -l calib -x -d 'Calibration data file, in any format forge finetune reads; required unless...'
complete -c forge -n '__forge_at transfer' -l calib-tokens -x -d 'Calibration tokens to use (whole examples, up to this count)'
complete -c forge -n '__forge_at transfer' -l dtype -x -a 'float32 float64' -d 'Dtype of both models during calibration; the sums are float64 either way'
complete -c forge -n '__forge_at transfer' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at transfer' -l json -d 'Print the run record as one JSON document on stdout'
complete -c forge -n '__forge_at transfer' -l layer-map -x -d 'Which source layer each target layer takes its update from: target layer j...'
complete -c forge -n '__forge_at transfer' -l max-length -x -d 'Maximum tokens per calibration example; longer ones are truncated'
complete -c forge -n '__forge_at transfer' -l output -s o -x -a '(__fish_complete_directories)' -d 'HF model directory to write, with transported_vector.safetensors and...'
complete -c forge -n '__forge_at transfer' -l overwrite -d 'Replace an existing output directory'
complete -c forge -n '__forge_at transfer' -l quiet -d 'No progress bars or log lines on stderr'
complete -c forge -n '__forge_at transfer' -l source-base -x -d 'Base model the task vector was made on (built-in name, HF dir or .gguf)'
complete -c forge -n '__forge_at transfer' -l source-tuned -x -d 'Fine-tuned source model; the vector is it minus --source-base'
complete -c forge -n '__forge_at transfer' -l target-base -x -d 'New base model to carry the vector to'
complete -c forge -n '__forge_at transfer' -l vector -r -F -d 'Task-vector file from `forge edit diff` against --source-base (instead of...'
complete -c forge -n '__forge_at transfer' -l whiten -d 'Estimate each map on whitened coordinates, so that low-variance directions...'

# forge transfer make-test-target
complete -c forge -n '__forge_at transfer make-test-target' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at transfer make-test-target' -l json -d 'Print the run record as one JSON document on stdout'
complete -c forge -n '__forge_at transfer make-test-target' -l model -r -F -a 'gemma3-270m smollm2-135m' -d 'Source model reference: a built-in name, HF directory or .gguf file'
complete -c forge -n '__forge_at transfer make-test-target' -l output -s o -x -a '(__fish_complete_directories)' -d 'HF model directory to write, with forge_run.json'
complete -c forge -n '__forge_at transfer make-test-target' -l overwrite -d 'Replace an existing output directory'
complete -c forge -n '__forge_at transfer make-test-target' -l permute-heads -d 'Also permute the attention heads of every layer, keeping grouped-query...'
complete -c forge -n '__forge_at transfer make-test-target' -l permute-mlp -d 'Also permute the MLP units of every layer'
complete -c forge -n '__forge_at transfer make-test-target' -l quiet -d 'No progress bars on stderr'
complete -c forge -n '__forge_at transfer make-test-target' -l seed -x -d 'Seed of the rotation and the permutations'

# forge zo
complete -c forge -n '__forge_at zo' -l alpha -x -d 'LoRA alpha of mezo-lora; the update is scaled by alpha/rank (default 2 x rank)'
complete -c forge -n '__forge_at zo' -l backend -x -d 'Scoring backend; plugins add more through the forge_zo_backends hook'
complete -c forge -n '__forge_at zo' -l batch-size -x -d 'Examples per step'
complete -c forge -n '__forge_at zo' -l column -x -d 'LM objective: read the format\'s FIELD from the record field NAME (repeatable)'
complete -c forge -n '__forge_at zo' -l completion-template -x -d 'LM objective: completion built from record fields'
complete -c forge -n '__forge_at zo' -l data -x -d 'Training data: a .jsonl/.json/.csv/.tsv/.txt file, or demo:NAME'
complete -c forge -n '__forge_at zo' -l dtype -x -a 'bf16 fp32' -d 'Scoring dtype of the frozen base; the trained state is always fp32'
complete -c forge -n '__forge_at zo' -l eps -x -d 'Perturbation scale (default 1e-3; mezo-lora 1e-2)'
complete -c forge -n '__forge_at zo' -l eval-batch-size -x -d 'Dev examples per forward'
complete -c forge -n '__forge_at zo' -l eval-data -x -d 'Dev set in the training data\'s format: accuracy (classification) or loss'
complete -c forge -n '__forge_at zo' -l eval-every -x -d 'Evaluate on --eval-data every N steps (always at step 0 and at the end)'
complete -c forge -n '__forge_at zo' -l eval-limit -x -d 'Use only the first N dev records'
complete -c forge -n '__forge_at zo' -l format -x -a 'auto chat instruction prompt-completion text' -d 'Record format of the LM objective (as in forge finetune)'
complete -c forge -n '__forge_at zo' -l help -s h -d 'Show this message and exit'
complete -c forge -n '__forge_at zo' -l json -d 'Print the run summary as one JSON document on stdout'
complete -c forge -n '__forge_at zo' -l label-field -x -d 'Record field holding the label'
complete -c forge -n '__forge_at zo' -l limit -x -d 'Use only the first N training records'
complete -c forge -n '__forge_at zo' -l lr -x -d 'Constant learning rate (default: mezo-lora 1e-3, lozo and lozo-m 1e-5, mezo...'
complete -c forge -n '__forge_at zo' -l max-length -x -d 'Maximum tokens per example'
complete -c forge -n '__forge_at zo' -l method -x -a 'lozo lozo-m mezo mezo-lora' -d 'mezo: full-parameter SPSA; mezo-lora: SPSA on LoRA factors; lozo: low-rank U...'
complete -c forge -n '__forge_at zo' -l model -r -F -a 'gemma3-270m smollm2-135m' -d 'Base model reference: a built-in name, HF directory or .gguf file'
complete -c forge -n '__forge_at zo' -l momentum -x -d 'lozo-m: momentum coefficient'
complete -c forge -n '__forge_at zo' -l no-packing -l packing -d 'Pack each batch\'s examples into dense rows so no padding is computed'
complete -c forge -n '__forge_at zo' -l nu -x -d 'lozo: steps between redraws of V'
complete -c forge -n '__forge_at zo' -l output -s o -r -F -d 'Directory to write: a PEFT adapter (mezo-lora) or an HF model, plus...'
complete -c forge -n '__forge_at zo' -l overwrite -d 'Replace an existing output directory'
complete -c forge -n '__forge_at zo' -l perturbation -x -a 'exact factorised' -d 'mezo only'
complete -c forge -n '__forge_at zo' -l prompt-template -x -d 'LM objective: prompt built from record fields'
complete -c forge -n '__forge_at zo' -l queries -x -d 'Directions q per step; the 2q states are scored in one forward and the...'
complete -c forge -n '__forge_at zo' -l quiet -d 'No progress bars'
complete -c forge -n '__forge_at zo' -l rank -x -d 'LoRA rank (mezo-lora, default 8), rank of U V^T (lozo, default 2), or factor...'
complete -c forge -n '__forge_at zo' -l resume -d 'Continue an unfinished run from OUTPUT.partial/ with the same settings'
complete -c forge -n '__forge_at zo' -l save-every -x -d 'Save the trainable state to OUTPUT.partial/ every N steps'
complete -c forge -n '__forge_at zo' -l seed -x -d 'Seed of the data order, noise and LoRA init'
complete -c forge -n '__forge_at zo' -l single-token -x -a 'auto require' -d 'auto scores multi-token words one row per option; require rejects them'
complete -c forge -n '__forge_at zo' -l steps -x -d 'Number of zeroth-order steps'
complete -c forge -n '__forge_at zo' -l target-modules -x -d 'Linear modules to train: all-linear or names such as q_proj,v_proj'
complete -c forge -n '__forge_at zo' -l template -x -d 'Classification prompt filled from record fields, ending in the cue, e.g'
complete -c forge -n '__forge_at zo' -l threads -x -d 'CPU threads for torch (default: one per core)'
complete -c forge -n '__forge_at zo' -l verbalizers -x -d 'Classification labels and their words, e.g'
complete -c forge -n '__forge_at zo' -l weight-decay -x -d 'Decoupled weight decay on the trained weights (lozo: forces a dense update...'
