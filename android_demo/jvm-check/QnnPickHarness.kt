// Runs the app's own model.json reader (ModelManifest.parse) and QNN context picker
// (QnnContextPicker.kt) on the JVM for tests/test_package.py, against a package folder:
//   QnnPickHarness <package dir> <case>...      a case is SDK_INT:SOC_MODEL, "-" for no SOC_MODEL,
//                                               with ":fail" when the chosen context fails to open
// Prints one tab-separated line per case: the case, the provider label, the context model file
// (or "-") and the fallback sentence (or "-"); first a line "contexts<TAB>SOC,SOC" as parsed.
import org.quantface.demo.ModelManifest
import org.quantface.demo.QnnContextPicker
import org.quantface.demo.QnnModelChoice
import java.io.File
import java.security.MessageDigest

private fun sha256(file: File): String? =
    if (!file.isFile) null
    else MessageDigest.getInstance("SHA-256").digest(file.readBytes()).joinToString("") { "%02x".format(it) }

fun main(args: Array<String>) {
    val folder = File(args[0])
    val manifest = ModelManifest.parse(File(folder, ModelManifest.MODEL_JSON_ASSET).readText())
    println("contexts\t" + manifest.qnnContexts.joinToString(",") { it.soc })
    for (case in args.drop(1)) {
        val parts = case.split(":")
        val soc = parts[1].takeUnless { it == "-" }
        var choice = QnnContextPicker.pick(manifest.qnnContexts, parts[0].toInt(), soc) { sha256(File(folder, it)) }
        if (parts.getOrNull(2) == "fail" && choice is QnnModelChoice.Context) {
            choice = QnnContextPicker.loadFailed(choice.context, "QNN_CONTEXT_ERROR: stand-in failure\nsecond line")
        }
        val file = (choice as? QnnModelChoice.Context)?.context?.modelFile ?: "-"
        val reason = (choice as? QnnModelChoice.Plain)?.reason ?: "-"
        println(listOf(case, QnnContextPicker.label(choice), file, reason).joinToString("\t"))
    }
}
