# bash completion for forge.
# Generated from the click tree of forge and its loaded plugins. Do not edit by hand.
# Install: source this file from ~/.bashrc, or copy it to
# ~/.local/share/bash-completion/completions/forge.

# Load the subcommands, option names and positional argument names of the command path $1.
_forge_command() {
    _forge_subcommands=() _forge_options=() _forge_arguments=() _forge_variadic=0
    case "$1" in
        'forge')
            _forge_subcommands=(cache completion edit eval finetune models plugins transfer zo)
            _forge_options=(--allow-pickle --debug --help --version -h)
            ;;
        'forge cache')
            _forge_subcommands=(gc info ls rm verify)
            _forge_options=(--help -h)
            ;;
        'forge cache gc')
            _forge_options=(--dry-run --help --json --unused-days -h)
            ;;
        'forge cache info')
            _forge_options=(--help --json -h)
            _forge_arguments=(keys)
            _forge_variadic=1
            ;;
        'forge cache ls')
            _forge_options=(--help --json --kind -h)
            ;;
        'forge cache rm')
            _forge_options=(--all --dry-run --help --json --kind -h)
            _forge_arguments=(keys)
            _forge_variadic=1
            ;;
        'forge cache verify')
            _forge_options=(--help --json -h)
            ;;
        'forge completion')
            _forge_options=(--help -h)
            _forge_arguments=(shell)
            ;;
        'forge edit')
            _forge_subcommands=(apply diff layers merge sae)
            _forge_options=(--help -h)
            ;;
        'forge edit apply')
            _forge_options=(--base --help --json --k --lambda --output --overwrite --project --quiet --sae --scores --seed --select --vector -h -o)
            ;;
        'forge edit diff')
            _forge_options=(--base --help --json --output --overwrite --quiet --rank --tuned -h -o)
            ;;
        'forge edit layers')
            _forge_options=(--column --completion-template --dtype --eps --format --general-data --general-format --help --json --keep-bos --max-length --min-rate --model --output --overwrite --plot --prompt-template --quiet --sae --skip-bos --statistic --task-data --threads --tokens --top-m -h -o)
            ;;
        'forge edit merge')
            _forge_options=(--base --help --json --lambda --layers --method --modules --no-normalize --normalize --output --overwrite --quiet --seed --vector -h -o)
            ;;
        'forge edit sae')
            _forge_subcommands=(info train)
            _forge_options=(--help -h)
            ;;
        'forge edit sae info')
            _forge_options=(--help --json --model -h)
            _forge_arguments=(directory)
            ;;
        'forge edit sae train')
            _forge_options=(--batch-size --column --data --dead-tokens --dtype --epochs --expansion --format --help --json --k --keep-bos --layers --lr --max-length --model --output --overwrite --quiet --seed --skip-bos --steps --threads --tokens -h -o)
            ;;
        'forge eval')
            _forge_subcommands=(drift interpolate spectra)
            _forge_options=(--baseline --batch-size --data-dir --dtype --general --help --json --limit --list-tasks --model --no-cache --output --plot --quiet --seed --target --task-file -h -o)
            ;;
        'forge eval drift')
            _forge_options=(--baseline --batch-size --data --data-dir --dtype --eps --help --json --limit --max-tokens --model --modules --output --plots --quiet --seed --task-file -h -o)
            ;;
        'forge eval interpolate')
            _forge_options=(--alphas --baseline --batch-size --checkpoints --data-dir --dtype --general --help --json --limit --model --no-cache --oft-scale --output --overwrite --plots --quiet --seed --target --task-file --tolerance --write-best -h -o)
            ;;
        'forge eval spectra')
            _forge_options=(--base --help --json --model --modules --normalize --output --padding --plots --quiet --window -h -o)
            ;;
        'forge finetune')
            _forge_options=(--alpha --batch-size --bf16 --block-size --budget --column --completion-template --data --dropout --dry-run --epochs --eval-data --eval-every --eval-split --format --grad-accum --help --json --limit --list-methods --lr --max-grad-norm --max-length --merge --method --model --no-bf16 --no-packing --output --overlong --overwrite --packing --prompt-template --quiet --rank --resume --save-every --schedule --seed --steps --target-modules --threads --warmup-steps -h -o)
            ;;
        'forge models')
            _forge_options=(--help --json -h)
            ;;
        'forge plugins')
            _forge_options=(--help --json -h)
            ;;
        'forge transfer')
            _forge_subcommands=(make-test-target)
            _forge_options=(--align --alpha --alpha-data --alpha-grid --batch-size --calib --calib-tokens --dtype --help --json --layer-map --max-length --output --overwrite --quiet --source-base --source-tuned --target-base --vector --whiten -h -o)
            ;;
        'forge transfer make-test-target')
            _forge_options=(--help --json --model --output --overwrite --permute-heads --permute-mlp --quiet --seed -h -o)
            ;;
        'forge zo')
            _forge_options=(--alpha --backend --batch-size --column --completion-template --data --dtype --eps --eval-batch-size --eval-data --eval-every --eval-limit --format --help --json --label-field --limit --lr --max-length --method --model --momentum --no-packing --nu --output --overwrite --packing --perturbation --prompt-template --queries --quiet --rank --resume --save-every --seed --single-token --steps --target-modules --template --threads --verbalizers --weight-decay -h -o)
            ;;
    esac
}

# Set _forge_nargs to the number of values that option $2 of command path $1 takes.
_forge_option_nargs() {
    case "$1|$2" in
        'forge cache gc|--unused-days') _forge_nargs=1 ;;
        'forge cache ls|--kind') _forge_nargs=1 ;;
        'forge cache rm|--kind') _forge_nargs=1 ;;
        'forge edit apply|--base') _forge_nargs=1 ;;
        'forge edit apply|--k') _forge_nargs=1 ;;
        'forge edit apply|--lambda') _forge_nargs=1 ;;
        'forge edit apply|--output'|'forge edit apply|-o') _forge_nargs=1 ;;
        'forge edit apply|--project') _forge_nargs=1 ;;
        'forge edit apply|--sae') _forge_nargs=1 ;;
        'forge edit apply|--scores') _forge_nargs=1 ;;
        'forge edit apply|--seed') _forge_nargs=1 ;;
        'forge edit apply|--select') _forge_nargs=1 ;;
        'forge edit apply|--vector') _forge_nargs=1 ;;
        'forge edit diff|--base') _forge_nargs=1 ;;
        'forge edit diff|--output'|'forge edit diff|-o') _forge_nargs=1 ;;
        'forge edit diff|--rank') _forge_nargs=1 ;;
        'forge edit diff|--tuned') _forge_nargs=1 ;;
        'forge edit layers|--column') _forge_nargs=1 ;;
        'forge edit layers|--completion-template') _forge_nargs=1 ;;
        'forge edit layers|--dtype') _forge_nargs=1 ;;
        'forge edit layers|--eps') _forge_nargs=1 ;;
        'forge edit layers|--format') _forge_nargs=1 ;;
        'forge edit layers|--general-data') _forge_nargs=1 ;;
        'forge edit layers|--general-format') _forge_nargs=1 ;;
        'forge edit layers|--max-length') _forge_nargs=1 ;;
        'forge edit layers|--min-rate') _forge_nargs=1 ;;
        'forge edit layers|--model') _forge_nargs=1 ;;
        'forge edit layers|--output'|'forge edit layers|-o') _forge_nargs=1 ;;
        'forge edit layers|--plot') _forge_nargs=1 ;;
        'forge edit layers|--prompt-template') _forge_nargs=1 ;;
        'forge edit layers|--sae') _forge_nargs=1 ;;
        'forge edit layers|--statistic') _forge_nargs=1 ;;
        'forge edit layers|--task-data') _forge_nargs=1 ;;
        'forge edit layers|--threads') _forge_nargs=1 ;;
        'forge edit layers|--tokens') _forge_nargs=1 ;;
        'forge edit layers|--top-m') _forge_nargs=1 ;;
        'forge edit merge|--base') _forge_nargs=1 ;;
        'forge edit merge|--lambda') _forge_nargs=1 ;;
        'forge edit merge|--layers') _forge_nargs=1 ;;
        'forge edit merge|--method') _forge_nargs=1 ;;
        'forge edit merge|--modules') _forge_nargs=1 ;;
        'forge edit merge|--output'|'forge edit merge|-o') _forge_nargs=1 ;;
        'forge edit merge|--seed') _forge_nargs=1 ;;
        'forge edit merge|--vector') _forge_nargs=1 ;;
        'forge edit sae info|--model') _forge_nargs=1 ;;
        'forge edit sae train|--batch-size') _forge_nargs=1 ;;
        'forge edit sae train|--column') _forge_nargs=1 ;;
        'forge edit sae train|--data') _forge_nargs=1 ;;
        'forge edit sae train|--dead-tokens') _forge_nargs=1 ;;
        'forge edit sae train|--dtype') _forge_nargs=1 ;;
        'forge edit sae train|--epochs') _forge_nargs=1 ;;
        'forge edit sae train|--expansion') _forge_nargs=1 ;;
        'forge edit sae train|--format') _forge_nargs=1 ;;
        'forge edit sae train|--k') _forge_nargs=1 ;;
        'forge edit sae train|--layers') _forge_nargs=1 ;;
        'forge edit sae train|--lr') _forge_nargs=1 ;;
        'forge edit sae train|--max-length') _forge_nargs=1 ;;
        'forge edit sae train|--model') _forge_nargs=1 ;;
        'forge edit sae train|--output'|'forge edit sae train|-o') _forge_nargs=1 ;;
        'forge edit sae train|--seed') _forge_nargs=1 ;;
        'forge edit sae train|--steps') _forge_nargs=1 ;;
        'forge edit sae train|--threads') _forge_nargs=1 ;;
        'forge edit sae train|--tokens') _forge_nargs=1 ;;
        'forge eval|--baseline') _forge_nargs=1 ;;
        'forge eval|--batch-size') _forge_nargs=1 ;;
        'forge eval|--data-dir') _forge_nargs=1 ;;
        'forge eval|--dtype') _forge_nargs=1 ;;
        'forge eval|--general') _forge_nargs=1 ;;
        'forge eval|--limit') _forge_nargs=1 ;;
        'forge eval|--model') _forge_nargs=1 ;;
        'forge eval|--output'|'forge eval|-o') _forge_nargs=1 ;;
        'forge eval|--plot') _forge_nargs=1 ;;
        'forge eval|--seed') _forge_nargs=1 ;;
        'forge eval|--target') _forge_nargs=1 ;;
        'forge eval|--task-file') _forge_nargs=1 ;;
        'forge eval drift|--baseline') _forge_nargs=1 ;;
        'forge eval drift|--batch-size') _forge_nargs=1 ;;
        'forge eval drift|--data') _forge_nargs=1 ;;
        'forge eval drift|--data-dir') _forge_nargs=1 ;;
        'forge eval drift|--dtype') _forge_nargs=1 ;;
        'forge eval drift|--eps') _forge_nargs=1 ;;
        'forge eval drift|--limit') _forge_nargs=1 ;;
        'forge eval drift|--max-tokens') _forge_nargs=1 ;;
        'forge eval drift|--model') _forge_nargs=1 ;;
        'forge eval drift|--modules') _forge_nargs=1 ;;
        'forge eval drift|--output'|'forge eval drift|-o') _forge_nargs=1 ;;
        'forge eval drift|--plots') _forge_nargs=1 ;;
        'forge eval drift|--seed') _forge_nargs=1 ;;
        'forge eval drift|--task-file') _forge_nargs=1 ;;
        'forge eval interpolate|--alphas') _forge_nargs=1 ;;
        'forge eval interpolate|--baseline') _forge_nargs=1 ;;
        'forge eval interpolate|--batch-size') _forge_nargs=1 ;;
        'forge eval interpolate|--data-dir') _forge_nargs=1 ;;
        'forge eval interpolate|--dtype') _forge_nargs=1 ;;
        'forge eval interpolate|--general') _forge_nargs=1 ;;
        'forge eval interpolate|--limit') _forge_nargs=1 ;;
        'forge eval interpolate|--model') _forge_nargs=1 ;;
        'forge eval interpolate|--oft-scale') _forge_nargs=1 ;;
        'forge eval interpolate|--output'|'forge eval interpolate|-o') _forge_nargs=1 ;;
        'forge eval interpolate|--plots') _forge_nargs=1 ;;
        'forge eval interpolate|--seed') _forge_nargs=1 ;;
        'forge eval interpolate|--target') _forge_nargs=1 ;;
        'forge eval interpolate|--task-file') _forge_nargs=1 ;;
        'forge eval interpolate|--tolerance') _forge_nargs=1 ;;
        'forge eval interpolate|--write-best') _forge_nargs=1 ;;
        'forge eval spectra|--base') _forge_nargs=1 ;;
        'forge eval spectra|--model') _forge_nargs=1 ;;
        'forge eval spectra|--modules') _forge_nargs=1 ;;
        'forge eval spectra|--normalize') _forge_nargs=1 ;;
        'forge eval spectra|--output'|'forge eval spectra|-o') _forge_nargs=1 ;;
        'forge eval spectra|--padding') _forge_nargs=1 ;;
        'forge eval spectra|--plots') _forge_nargs=1 ;;
        'forge eval spectra|--window') _forge_nargs=1 ;;
        'forge finetune|--alpha') _forge_nargs=1 ;;
        'forge finetune|--batch-size') _forge_nargs=1 ;;
        'forge finetune|--block-size') _forge_nargs=1 ;;
        'forge finetune|--budget') _forge_nargs=1 ;;
        'forge finetune|--column') _forge_nargs=1 ;;
        'forge finetune|--completion-template') _forge_nargs=1 ;;
        'forge finetune|--data') _forge_nargs=1 ;;
        'forge finetune|--dropout') _forge_nargs=1 ;;
        'forge finetune|--epochs') _forge_nargs=1 ;;
        'forge finetune|--eval-data') _forge_nargs=1 ;;
        'forge finetune|--eval-every') _forge_nargs=1 ;;
        'forge finetune|--eval-split') _forge_nargs=1 ;;
        'forge finetune|--format') _forge_nargs=1 ;;
        'forge finetune|--grad-accum') _forge_nargs=1 ;;
        'forge finetune|--limit') _forge_nargs=1 ;;
        'forge finetune|--lr') _forge_nargs=1 ;;
        'forge finetune|--max-grad-norm') _forge_nargs=1 ;;
        'forge finetune|--max-length') _forge_nargs=1 ;;
        'forge finetune|--method') _forge_nargs=1 ;;
        'forge finetune|--model') _forge_nargs=1 ;;
        'forge finetune|--output'|'forge finetune|-o') _forge_nargs=1 ;;
        'forge finetune|--overlong') _forge_nargs=1 ;;
        'forge finetune|--prompt-template') _forge_nargs=1 ;;
        'forge finetune|--rank') _forge_nargs=1 ;;
        'forge finetune|--save-every') _forge_nargs=1 ;;
        'forge finetune|--schedule') _forge_nargs=1 ;;
        'forge finetune|--seed') _forge_nargs=1 ;;
        'forge finetune|--steps') _forge_nargs=1 ;;
        'forge finetune|--target-modules') _forge_nargs=1 ;;
        'forge finetune|--threads') _forge_nargs=1 ;;
        'forge finetune|--warmup-steps') _forge_nargs=1 ;;
        'forge transfer|--align') _forge_nargs=1 ;;
        'forge transfer|--alpha') _forge_nargs=1 ;;
        'forge transfer|--alpha-data') _forge_nargs=1 ;;
        'forge transfer|--alpha-grid') _forge_nargs=1 ;;
        'forge transfer|--batch-size') _forge_nargs=1 ;;
        'forge transfer|--calib') _forge_nargs=1 ;;
        'forge transfer|--calib-tokens') _forge_nargs=1 ;;
        'forge transfer|--dtype') _forge_nargs=1 ;;
        'forge transfer|--layer-map') _forge_nargs=1 ;;
        'forge transfer|--max-length') _forge_nargs=1 ;;
        'forge transfer|--output'|'forge transfer|-o') _forge_nargs=1 ;;
        'forge transfer|--source-base') _forge_nargs=1 ;;
        'forge transfer|--source-tuned') _forge_nargs=1 ;;
        'forge transfer|--target-base') _forge_nargs=1 ;;
        'forge transfer|--vector') _forge_nargs=1 ;;
        'forge transfer make-test-target|--model') _forge_nargs=1 ;;
        'forge transfer make-test-target|--output'|'forge transfer make-test-target|-o') _forge_nargs=1 ;;
        'forge transfer make-test-target|--seed') _forge_nargs=1 ;;
        'forge zo|--alpha') _forge_nargs=1 ;;
        'forge zo|--backend') _forge_nargs=1 ;;
        'forge zo|--batch-size') _forge_nargs=1 ;;
        'forge zo|--column') _forge_nargs=1 ;;
        'forge zo|--completion-template') _forge_nargs=1 ;;
        'forge zo|--data') _forge_nargs=1 ;;
        'forge zo|--dtype') _forge_nargs=1 ;;
        'forge zo|--eps') _forge_nargs=1 ;;
        'forge zo|--eval-batch-size') _forge_nargs=1 ;;
        'forge zo|--eval-data') _forge_nargs=1 ;;
        'forge zo|--eval-every') _forge_nargs=1 ;;
        'forge zo|--eval-limit') _forge_nargs=1 ;;
        'forge zo|--format') _forge_nargs=1 ;;
        'forge zo|--label-field') _forge_nargs=1 ;;
        'forge zo|--limit') _forge_nargs=1 ;;
        'forge zo|--lr') _forge_nargs=1 ;;
        'forge zo|--max-length') _forge_nargs=1 ;;
        'forge zo|--method') _forge_nargs=1 ;;
        'forge zo|--model') _forge_nargs=1 ;;
        'forge zo|--momentum') _forge_nargs=1 ;;
        'forge zo|--nu') _forge_nargs=1 ;;
        'forge zo|--output'|'forge zo|-o') _forge_nargs=1 ;;
        'forge zo|--perturbation') _forge_nargs=1 ;;
        'forge zo|--prompt-template') _forge_nargs=1 ;;
        'forge zo|--queries') _forge_nargs=1 ;;
        'forge zo|--rank') _forge_nargs=1 ;;
        'forge zo|--save-every') _forge_nargs=1 ;;
        'forge zo|--seed') _forge_nargs=1 ;;
        'forge zo|--single-token') _forge_nargs=1 ;;
        'forge zo|--steps') _forge_nargs=1 ;;
        'forge zo|--target-modules') _forge_nargs=1 ;;
        'forge zo|--template') _forge_nargs=1 ;;
        'forge zo|--threads') _forge_nargs=1 ;;
        'forge zo|--verbalizers') _forge_nargs=1 ;;
        'forge zo|--weight-decay') _forge_nargs=1 ;;
        *) _forge_nargs=0 ;;
    esac
}

# Complete the value of option $2, or of the argument named $2, of command path $1.
_forge_value() {
    case "$1|$2" in
        'forge completion|shell') _forge_words bash fish zsh ;;
        'forge edit apply|--output'|'forge edit apply|-o') _forge_directories ;;
        'forge edit apply|--project') _forge_words sae ;;
        'forge edit apply|--sae') _forge_directories ;;
        'forge edit apply|--scores') _forge_files ;;
        'forge edit apply|--vector') _forge_files ;;
        'forge edit diff|--output'|'forge edit diff|-o') _forge_files ;;
        'forge edit layers|--dtype') _forge_words bf16 fp32 ;;
        'forge edit layers|--format') _forge_words auto chat instruction prompt-completion text ;;
        'forge edit layers|--general-format') _forge_words auto chat instruction prompt-completion text ;;
        'forge edit layers|--model') _forge_words gemma3-270m smollm2-135m; _forge_files ;;
        'forge edit layers|--output'|'forge edit layers|-o') _forge_files ;;
        'forge edit layers|--plot') _forge_files ;;
        'forge edit layers|--sae') _forge_directories ;;
        'forge edit layers|--statistic') _forge_words mean rate ;;
        'forge edit merge|--output'|'forge edit merge|-o') _forge_directories ;;
        'forge edit sae info|--model') _forge_words gemma3-270m smollm2-135m; _forge_files ;;
        'forge edit sae info|directory') _forge_files ;;
        'forge edit sae train|--dtype') _forge_words bf16 fp32 ;;
        'forge edit sae train|--format') _forge_words auto chat instruction prompt-completion text ;;
        'forge edit sae train|--model') _forge_words gemma3-270m smollm2-135m; _forge_files ;;
        'forge edit sae train|--output'|'forge edit sae train|-o') _forge_files ;;
        'forge eval|--data-dir') _forge_directories ;;
        'forge eval|--dtype') _forge_words bfloat16 float32 ;;
        'forge eval|--output'|'forge eval|-o') _forge_files ;;
        'forge eval|--plot') _forge_files ;;
        'forge eval|--task-file') _forge_files ;;
        'forge eval drift|--data-dir') _forge_directories ;;
        'forge eval drift|--dtype') _forge_words bfloat16 float32 ;;
        'forge eval drift|--output'|'forge eval drift|-o') _forge_files ;;
        'forge eval drift|--plots') _forge_directories ;;
        'forge eval drift|--task-file') _forge_files ;;
        'forge eval interpolate|--data-dir') _forge_directories ;;
        'forge eval interpolate|--dtype') _forge_words bfloat16 float32 ;;
        'forge eval interpolate|--oft-scale') _forge_words linear sqrt ;;
        'forge eval interpolate|--output'|'forge eval interpolate|-o') _forge_files ;;
        'forge eval interpolate|--plots') _forge_directories ;;
        'forge eval interpolate|--task-file') _forge_files ;;
        'forge eval interpolate|--write-best') _forge_directories ;;
        'forge eval spectra|--normalize') _forge_words mean none ;;
        'forge eval spectra|--output'|'forge eval spectra|-o') _forge_files ;;
        'forge eval spectra|--padding') _forge_words edge reflect symmetric ;;
        'forge eval spectra|--plots') _forge_directories ;;
        'forge finetune|--format') _forge_words auto chat instruction prompt-completion text ;;
        'forge finetune|--method') _forge_words adalora boft dora full ia3 lora milora miss oft pissa rslora vera ;;
        'forge finetune|--model') _forge_words gemma3-270m smollm2-135m; _forge_files ;;
        'forge finetune|--output'|'forge finetune|-o') _forge_files ;;
        'forge finetune|--overlong') _forge_words reject truncate ;;
        'forge finetune|--schedule') _forge_words constant cosine ;;
        'forge transfer|--align') _forge_words activations bico naive ;;
        'forge transfer|--dtype') _forge_words float32 float64 ;;
        'forge transfer|--output'|'forge transfer|-o') _forge_directories ;;
        'forge transfer|--vector') _forge_files ;;
        'forge transfer make-test-target|--model') _forge_words gemma3-270m smollm2-135m; _forge_files ;;
        'forge transfer make-test-target|--output'|'forge transfer make-test-target|-o') _forge_directories ;;
        'forge zo|--dtype') _forge_words bf16 fp32 ;;
        'forge zo|--format') _forge_words auto chat instruction prompt-completion text ;;
        'forge zo|--method') _forge_words lozo lozo-m mezo mezo-lora ;;
        'forge zo|--model') _forge_words gemma3-270m smollm2-135m; _forge_files ;;
        'forge zo|--output'|'forge zo|-o') _forge_files ;;
        'forge zo|--perturbation') _forge_words exact factorised ;;
        'forge zo|--single-token') _forge_words auto require ;;
    esac
}

# Add the arguments that start with the word being completed ($cur) to COMPREPLY.
_forge_words() {
    local word
    for word in "$@"; do
        if [[ $word == "$cur"* ]]; then
            COMPREPLY+=("$word")
        fi
    done
}

# Add the file and directory names that start with $cur to COMPREPLY.
_forge_files() {
    compopt -o filenames 2>/dev/null
    mapfile -t -O "${#COMPREPLY[@]}" COMPREPLY < <(compgen -f -- "$cur")
}

# Add the directory names that start with $cur to COMPREPLY.
_forge_directories() {
    compopt -o filenames 2>/dev/null
    mapfile -t -O "${#COMPREPLY[@]}" COMPREPLY < <(compgen -d -- "$cur")
}

# Complete the word at COMP_CWORD: walk the earlier words to find the (sub)command, skip the
# values of options, then offer an option value, option names, subcommands or an argument.
# Bash splits "--option=value" into three words, so a lone "=" word is handled as a separator.
_forge() {
    local cur="${COMP_WORDS[COMP_CWORD]}" path=forge word
    local i=1 position=0 options_ended=0
    local _forge_nargs _forge_variadic _forge_subcommands _forge_options _forge_arguments
    COMPREPLY=()

    while (( i < COMP_CWORD )); do
        word="${COMP_WORDS[i]}"
        _forge_command "$path"
        if (( ! options_ended )) && [[ $word == -- ]]; then
            options_ended=1
        elif (( ! options_ended )) && [[ $word == -* ]]; then
            _forge_option_nargs "$path" "$word"
            if (( _forge_nargs > 0 )) && [[ ${COMP_WORDS[i+1]-} == "=" ]]; then
                if (( COMP_CWORD <= i + 2 )); then
                    [[ $cur == "=" ]] && cur=""
                    _forge_value "$path" "$word"
                    return 0
                fi
                (( i += 2 ))
            elif (( _forge_nargs > 0 && COMP_CWORD <= i + _forge_nargs )); then
                _forge_value "$path" "$word"
                return 0
            else
                (( i += _forge_nargs ))
            fi
        elif _forge_is_subcommand "$word"; then
            path="$path $word"
            position=0
            options_ended=0
        else
            (( position += 1 ))
        fi
        (( i += 1 ))
    done

    _forge_command "$path"
    if (( ! options_ended )) && [[ $cur == -* ]]; then
        _forge_words "${_forge_options[@]}"
    elif (( ${#_forge_subcommands[@]} )); then
        _forge_words "${_forge_subcommands[@]}"
    elif (( position < ${#_forge_arguments[@]} )); then
        _forge_value "$path" "${_forge_arguments[position]}"
    elif (( ${#_forge_arguments[@]} && _forge_variadic )); then
        _forge_value "$path" "${_forge_arguments[-1]}"
    fi
    return 0
}

# Succeed when $1 is a subcommand of the command that _forge_command loaded last.
_forge_is_subcommand() {
    local name
    for name in "${_forge_subcommands[@]}"; do
        [[ $name == "$1" ]] && return 0
    done
    return 1
}

complete -F _forge forge
