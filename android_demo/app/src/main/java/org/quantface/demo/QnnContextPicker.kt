package org.quantface.demo

/**
 * Which model the `qnn` flavour opens on the QNN provider: the offline-compiled context for this
 * phone's Snapdragon SoC when the package has one, else the plain graph. Pure Kotlin (no Android
 * types), so android_demo/jvm-check runs it on the JVM for tests/test_package.py; [Restorer] feeds it
 * `Build.VERSION.SDK_INT` and `Build.SOC_MODEL`.
 */

/** One entry of model.json's `qnn_contexts` (quantface/model_json.py `QnnContextEntry`). */
data class QnnContext(
    val soc: String, // Qualcomm part number, e.g. SM8650
    val marketing: String, // e.g. Snapdragon 8 Gen 3
    val socModel: Int,
    val htpArch: Int,
    val modelFile: String, // the EPContext model a QNN session opens (*_ctx.onnx)
    val modelSha256: String,
    val binaryFile: String, // the context binary it names, found beside it
    val binarySha256: String,
    val binaryBytes: Long,
)

/** What [QnnContextPicker.pick] decided. */
sealed class QnnModelChoice {
    /** Open [context]'s model file (its binary beside it). */
    data class Context(val context: QnnContext) : QnnModelChoice()

    /** Open the plain .onnx / .ort; [reason] is one sentence for the status line and the log. */
    data class Plain(val reason: String) : QnnModelChoice()
}

object QnnContextPicker {
    /** `Build.SOC_MODEL` exists from this API level (Android 12) on. */
    const val SOC_MODEL_API = 31

    /** The provider as the screen shows it, e.g. "QNN (context SM8650)" or "QNN (plain graph)". */
    fun label(choice: QnnModelChoice): String = when (choice) {
        is QnnModelChoice.Context -> "QNN (context ${choice.context.soc})"
        is QnnModelChoice.Plain -> "QNN (plain graph)"
    }

    /**
     * The part number in a `Build.SOC_MODEL` value: trimmed, upper case, without a bin suffix such
     * as "-AC" (SM8550-AC, the "for Galaxy" part, has the same HTP as SM8550); null when the device
     * does not say ("", "unknown").
     */
    fun partNumber(socModel: String?): String? {
        val part = socModel?.trim()?.uppercase()?.substringBefore('-')?.trim().orEmpty()
        return if (part.isEmpty() || part == "UNKNOWN") null else part
    }

    /**
     * The context for this device, or the plain graph and why.
     *
     * @param contexts model.json's `qnn_contexts` (empty when the package has none, or predates them)
     * @param sdkInt `Build.VERSION.SDK_INT`
     * @param socModel `Build.SOC_MODEL` (null below [SOC_MODEL_API])
     * @param sha256Of the hex sha256 of a file of the package, or null if the package lacks it
     */
    fun pick(contexts: List<QnnContext>, sdkInt: Int, socModel: String?, sha256Of: (String) -> String?): QnnModelChoice {
        if (contexts.isEmpty()) {
            return QnnModelChoice.Plain("QNN runs the plain graph: the package has no QNN context " +
                "(package it with --qnn-context SOC for this phone's Snapdragon).")
        }
        val listed = contexts.joinToString(", ") { it.soc }
        if (sdkInt < SOC_MODEL_API) {
            return QnnModelChoice.Plain("QNN runs the plain graph: Android API $sdkInt cannot tell the SoC " +
                "(Build.SOC_MODEL needs API $SOC_MODEL_API), so none of the contexts for $listed is used.")
        }
        val part = partNumber(socModel)
            ?: return QnnModelChoice.Plain("QNN runs the plain graph: this phone does not report its SoC " +
                "(Build.SOC_MODEL is \"${socModel.orEmpty()}\"), so none of the contexts for $listed is used.")
        val context = contexts.firstOrNull { partNumber(it.soc) == part }
            ?: return QnnModelChoice.Plain("QNN runs the plain graph: the package has no context for this " +
                "phone's SoC $part (only for $listed).")
        for ((file, expected) in listOf(context.modelFile to context.modelSha256, context.binaryFile to context.binarySha256)) {
            val actual = sha256Of(file)
                ?: return QnnModelChoice.Plain("QNN runs the plain graph: the context for $part names $file, " +
                    "which is not in the app's assets.")
            if (!actual.equals(expected, ignoreCase = true)) {
                return QnnModelChoice.Plain("QNN runs the plain graph: $file does not match model.json's " +
                    "sha256 (package it again).")
            }
        }
        return QnnModelChoice.Context(context)
    }

    /** The sentence when the chosen context was picked but ONNX Runtime could not open it. */
    fun loadFailed(context: QnnContext, error: String?): QnnModelChoice.Plain =
        QnnModelChoice.Plain("QNN runs the plain graph: the context for ${context.soc} did not load " +
            "(${error?.lineSequence()?.firstOrNull()?.trim().orEmpty().ifEmpty { "no message" }}).")
}
